"""The shapes world of the CPU fine-tuning experiment: data, a pretrained pixel UNet and a
learned, hackable circle reward (experiment-only code)."""
