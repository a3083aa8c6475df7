"""ONNX Runtime backend: an exported draft/target pair with IO-bound KV caches.

Needs the ``ort`` extra (onnxruntime or onnxruntime-gpu, and tokenizers; the verification
graph also needs onnx).

    from quickdraft.ort_backend import DecodeConfig, Generator
    gen = Generator.load("OUT_DIR", device="auto")
    result = gen.generate("def main(", DecodeConfig(max_new_tokens=32, gamma=4, seed=0))

``Generator.load`` runs either kind of ``quickdraft export`` folder: dynamic caches
(:class:`OrtModel`) or static caches (:class:`StaticOrtModel`, CUDA graphs on CUDA; by
default sampled generations verify on the device, greedy ones compare the target's argmax
ids, computed in its graph, on the host).
"""

from quickdraft.ort_backend.device import CudaUnavailableError, Device, resolve_device
from quickdraft.ort_backend.generator import (
    VERIFY_MODES,
    DecodeConfig,
    FastGenerator,
    Generation,
    Generator,
    OrtStats,
    Piece,
    SpeculativeGenerator,
    load_model,
)
from quickdraft.ort_backend.model import ExportedModel, ModelFolderError, OrtModel, OrtState
from quickdraft.ort_backend.static import StaticDecodeState, StaticModelError, StaticOrtModel
from quickdraft.ort_backend.text import StreamDecoder, load_tokenizer
from quickdraft.ort_backend.timing import ModelTimes, TimedModel, TimedState
from quickdraft.ort_backend.verify_graph import DeviceVerifier, GraphVerifier

__all__ = [
    "CudaUnavailableError",
    "DecodeConfig",
    "Device",
    "DeviceVerifier",
    "ExportedModel",
    "FastGenerator",
    "Generation",
    "Generator",
    "GraphVerifier",
    "ModelFolderError",
    "ModelTimes",
    "OrtModel",
    "OrtState",
    "OrtStats",
    "Piece",
    "SpeculativeGenerator",
    "StaticDecodeState",
    "StaticModelError",
    "StaticOrtModel",
    "StreamDecoder",
    "TimedModel",
    "TimedState",
    "VERIFY_MODES",
    "load_model",
    "load_tokenizer",
    "resolve_device",
]
