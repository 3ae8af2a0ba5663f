"""Text-to-video: UNet3D models (the ``TextToVideoSDPipeline`` layout, VideoCrafter2 with
its fps conditioning), frame selection for the reward and the video view of a task. The
rewards on frames are :mod:`halforder.diffusion.rewards.video`; the chain, the task and the
estimators are the image ones."""
from .components import (VIDEOCRAFTER2_SCALE, VideoCrafter2Options, check_videocrafter2_scheduler,
                         load_video_components, load_videocrafter2, tiny_video_components)
from .fps_unet import fps_unet_class
from .frames import FRAME_MODES, DecodedVideoReward, VideoView, decode_frames, frame_indices, parse_frames, video_view

__all__ = ["FRAME_MODES", "VIDEOCRAFTER2_SCALE", "DecodedVideoReward", "VideoCrafter2Options", "VideoView",
           "check_videocrafter2_scheduler", "decode_frames", "fps_unet_class", "frame_indices",
           "load_video_components", "load_videocrafter2", "parse_frames", "tiny_video_components", "video_view"]
