"""The chain machinery, model-agnostic: a diffusion model as a chain of solver steps.

``solvers`` (DDIM, DPM-Solver, flow-matching Euler), ``denoiser`` (functional call, CFG,
per-sample parameters), ``chain`` (the chain and its noise schedules), ``text`` (prompt
embeddings, the per-prompt cache), ``views`` (what the reward sees of the final latent).
The lowest layer of :mod:`halforder.diffusion`: it imports nothing from the models, the
rewards or the application.
"""
