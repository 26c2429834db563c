"""PyTorch models of the SyncTalk_2D family: `UNet328` (ave/hubert/wenet) and `AudioEncoder`."""
from export.models.audio_encoder import AudioEncoder
from export.models.unet import AUDIO_BRANCH_SHAPES, AUDIO_WINDOW_SHAPES, UNet328
from lipsync.contract import AUDIO_MODES, AudioMode

__all__ = [
    "AUDIO_BRANCH_SHAPES",
    "AUDIO_MODES",
    "AUDIO_WINDOW_SHAPES",
    "AudioEncoder",
    "AudioMode",
    "UNet328",
]
