from .config import PRESETS, ModelConfig, get_preset
from .transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "PRESETS", "get_preset"]
