"""halforder: unbiased gradient estimators (FO, HO, ZO, RLR) for recursive stochastic
chains, and reward fine-tuning of diffusion models with them."""
__version__ = "0.1.0"
