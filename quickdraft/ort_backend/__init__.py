"""ONNX Runtime backend: an exported draft/target pair with IO-bound KV caches.

Needs the ``ort`` extra (onnxruntime or onnxruntime-gpu, and tokenizers).

    from quickdraft.ort_backend import DecodeConfig, Generator
    gen = Generator.load("OUT_DIR", device="auto")
    result = gen.generate("def main(", DecodeConfig(max_new_tokens=32, gamma=4, seed=0))
"""

from quickdraft.ort_backend.device import CudaUnavailableError, Device, resolve_device
from quickdraft.ort_backend.generator import (
    DecodeConfig,
    Generation,
    Generator,
    OrtStats,
    Piece,
    SpeculativeGenerator,
)
from quickdraft.ort_backend.model import ModelFolderError, OrtModel, OrtState
from quickdraft.ort_backend.text import StreamDecoder, load_tokenizer
from quickdraft.ort_backend.timing import ModelTimes, TimedModel, TimedState

__all__ = [
    "CudaUnavailableError",
    "DecodeConfig",
    "Device",
    "Generation",
    "Generator",
    "ModelFolderError",
    "ModelTimes",
    "OrtModel",
    "OrtState",
    "OrtStats",
    "Piece",
    "SpeculativeGenerator",
    "StreamDecoder",
    "TimedModel",
    "TimedState",
    "load_tokenizer",
    "resolve_device",
]
