"""Inference engine: batched generation over the MLA latent cache with continuous batching."""

from .engine import Completion, Engine, SamplingParams
from .sampling import sample

__all__ = ["Engine", "SamplingParams", "Completion", "sample"]
