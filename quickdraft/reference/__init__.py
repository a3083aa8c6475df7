"""The NumPy reference: speculative sampling and its baseline on tiny models.

Everything here imports only NumPy, so it can be read top to bottom to learn the method.
"""

from quickdraft.generation import (
    GenerationResult,
    GenerationStats,
    ModelDrafter,
    autoregressive_generate,
    speculative_generate,
    speculative_step,
)
from quickdraft.reference.models import CharTokenizer, NgramModel, TableModel
from quickdraft.reference.safetensors_np import load_checkpoint, load_safetensors
from quickdraft.reference.transformer import NumpyTransformer, TransformerConfig

__all__ = [
    "GenerationResult",
    "GenerationStats",
    "ModelDrafter",
    "autoregressive_generate",
    "speculative_generate",
    "speculative_step",
    "CharTokenizer",
    "NgramModel",
    "TableModel",
    "NumpyTransformer",
    "TransformerConfig",
    "load_checkpoint",
    "load_safetensors",
]
