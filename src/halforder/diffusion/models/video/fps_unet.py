"""VideoCrafter2's frame-rate conditioning as a ``UNet3DConditionModel`` subclass.

VideoCrafter2 adds an embedding of the frame rate to the timestep embedding (its UNet's
``forward``: ``emb = time_embed(t) + fps_embedding(sinusoid(fps))``). Stock
``UNet3DConditionModel`` has no such modules: loading the diffusers conversion
``adamdad/videocrafterv2_diffusers`` into it drops the ``fps_*`` weights with only a log
warning, i.e. a silently different model. :class:`FPSUNet3DConditionModel` adds the two
modules under the conversion's names and feeds their output into the stock ``forward``
through its ``timestep_cond`` channel. The class is built on first use, so importing
this module does not import diffusers.
"""
from __future__ import annotations

import functools

import torch


def _fps_unet_class():
    from diffusers import UNet3DConditionModel
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    class _TimeEmbedding(TimestepEmbedding):
        """``TimestepEmbedding`` whose ``condition`` is added to its *output* (the fps
        embedding), with the same parameter names (``linear_1``, ``linear_2``)."""

        def forward(self, sample, condition=None):
            out = super().forward(sample)
            return out if condition is None else out + condition

    class FPSUNet3DConditionModel(UNet3DConditionModel):
        """``UNet3DConditionModel`` with VideoCrafter2's frame-rate conditioning.

        Two modules are added, named as in the diffusers conversion of VideoCrafter2:
        ``fps_proj = Timesteps(c0, flip_sin_to_cos=True, shift=0)`` (VideoCrafter's
        ``timestep_embedding``: [cos, sin] of fps * 10000^(-k/(c0/2))) and
        ``fps_embedding = TimestepEmbedding(c0, 4 c0)`` (linear, SiLU, linear); their output is
        added to the timestep embedding. ``forward`` takes ``fps`` (default: the config's
        ``fps``), so pipelines and :class:`ModuleDenoiser` that never pass it still work.

        Config: ``fps_cond`` (False: exactly the stock model), ``fps`` (default frame rate).
        """

        @register_to_config
        def __init__(self, sample_size=None, in_channels=4, out_channels=4,
                     down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
                     up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
                     block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
                     mid_block_scale_factor=1.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
                     cross_attention_dim=1024, attention_head_dim=64, num_attention_heads=None,
                     time_cond_proj_dim=None, fps_cond: bool = True, fps: float = 24.0):
            super().__init__(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                             down_block_types=down_block_types, up_block_types=up_block_types,
                             block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                             downsample_padding=downsample_padding, mid_block_scale_factor=mid_block_scale_factor,
                             act_fn=act_fn, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
                             cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
                             num_attention_heads=num_attention_heads, time_cond_proj_dim=time_cond_proj_dim)
            if not fps_cond:
                return
            if self.config.time_cond_proj_dim is not None:
                raise ValueError("fps conditioning uses the timestep_cond channel; time_cond_proj_dim must be None")
            c0 = self.config.block_out_channels[0]
            act = self.config.act_fn
            self.time_embedding = _TimeEmbedding(c0, 4 * c0, act_fn=act)
            self.fps_proj = Timesteps(c0, True, 0)
            self.fps_embedding = TimestepEmbedding(c0, 4 * c0, act_fn=act)

        def forward(self, sample, timestep, encoder_hidden_states, *args, fps=None, timestep_cond=None, **kwargs):
            if not self.config.fps_cond:
                return super().forward(sample, timestep, encoder_hidden_states, *args,
                                       timestep_cond=timestep_cond, **kwargs)
            if timestep_cond is not None:
                raise ValueError("FPSUNet3DConditionModel uses timestep_cond for the fps embedding; do not pass it")
            fps = self.config.fps if fps is None else fps
            fps = torch.as_tensor(fps, dtype=torch.float32, device=sample.device).reshape(-1)
            fps = fps.expand(sample.shape[0]) if fps.numel() == 1 else fps
            emb = self.fps_embedding(self.fps_proj(fps).to(self.dtype))
            return super().forward(sample, timestep, encoder_hidden_states, *args, timestep_cond=emb, **kwargs)

    return FPSUNet3DConditionModel


@functools.cache
def fps_unet_class():
    """The class :class:`FPSUNet3DConditionModel` (built on first use, so that importing this
    module does not import diffusers)."""
    return _fps_unet_class()


def __getattr__(name):  # module-level lazy attribute: FPSUNet3DConditionModel
    if name == "FPSUNet3DConditionModel":
        return fps_unet_class()
    raise AttributeError(name)
