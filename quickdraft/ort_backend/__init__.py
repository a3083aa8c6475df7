"""ONNX Runtime backend: an exported draft/target pair with IO-bound KV caches.

Needs the ``ort`` extra (onnxruntime or onnxruntime-gpu, and tokenizers; the verification
graph also needs onnx).

    from quickdraft.ort_backend import DecodeConfig, load_pair
    pair = load_pair("OUT_DIR", device="auto")
    with pair.generator(DecodeConfig(max_new_tokens=32, seed=0), gamma=4) as gen:
        result = gen.generate("def main(")
"""

from quickdraft.ort_backend.device import CudaUnavailableError, Device, resolve_device
from quickdraft.ort_backend.generator import (
    VERIFY_MODES,
    DecodeConfig,
    Generation,
    Generator,
    OrtStats,
    Pair,
    Piece,
    load_model,
    load_pair,
)
from quickdraft.ort_backend.model import (
    ExportedModel,
    ModelFolderError,
    OrtModel,
    OrtState,
    StateThreadError,
)
from quickdraft.ort_backend.static import StaticDecodeState, StaticModelError, StaticOrtModel
from quickdraft.ort_backend.text import StreamDecoder, load_tokenizer
from quickdraft.ort_backend.verify_graph import DeviceVerifier, GraphVerifier

__all__ = [
    "CudaUnavailableError",
    "DecodeConfig",
    "Device",
    "DeviceVerifier",
    "ExportedModel",
    "Generation",
    "Generator",
    "GraphVerifier",
    "ModelFolderError",
    "OrtModel",
    "OrtState",
    "OrtStats",
    "Pair",
    "Piece",
    "StateThreadError",
    "StaticDecodeState",
    "StaticModelError",
    "StaticOrtModel",
    "StreamDecoder",
    "VERIFY_MODES",
    "load_model",
    "load_pair",
    "load_tokenizer",
    "resolve_device",
]
