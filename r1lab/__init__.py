"""r1lab: the DeepSeek-R1 system in one readable PyTorch codebase."""

from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .engine import Completion, Engine, SamplingParams
from .grading import extract_answer, math_equal
from .model.config import PRESETS, ModelConfig, get_preset
from .model.transformer import Transformer
from .tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "PRESETS", "get_preset", "load_pretrained", "save_pretrained",
           "CheckpointError", "load_tokenizer", "Engine", "SamplingParams", "Completion",
           "extract_answer", "math_equal"]
