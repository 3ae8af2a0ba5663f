"""The models: a model's parts, its family, its adapter and the chain builder.

``hub`` (offline behaviour and its one error), ``components`` (a model's parts by their
pipeline names, SD 1/2 loading, tiny models), ``model_options`` (a family's options),
``families`` (one module a model family: loading, prompt encoding, the network's call),
``lora`` (the adapter), ``sd_chain`` (a model, prompts and a reward as a chain) and ``video``
(UNet3D models, frame selection, the video view). Builds on :mod:`halforder.diffusion.sampling`.
"""
