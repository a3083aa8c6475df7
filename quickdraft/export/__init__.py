"""Export Hugging Face draft/target causal LMs (and a draft of the draft) to ONNX with KV
caches (optimum-onnx, or onnxruntime-genai's builder for static caches).

Importing this package is light; the heavy dependencies (torch, transformers, optimum)
load when an export runs.
"""

from quickdraft.manifest import MANIFEST_NAME, ModelManifest, load_manifest

__all__ = [
    "MANIFEST_NAME",
    "ModelManifest",
    "load_manifest",
    "ExportReport",
    "ModelReport",
    "export_model",
    "export_pair",
    "check_pair",
    "check_three",
    "ExportError",
    "UnsupportedModelError",
    "VocabularyMismatchError",
    "ExportValidationError",
]

_LAZY = {
    "ExportReport": "quickdraft.export.api",
    "ModelReport": "quickdraft.export.api",
    "export_model": "quickdraft.export.api",
    "export_pair": "quickdraft.export.api",
    "check_pair": "quickdraft.export.checks",
    "check_three": "quickdraft.export.checks",
    "ExportError": "quickdraft.export.checks",
    "UnsupportedModelError": "quickdraft.export.checks",
    "VocabularyMismatchError": "quickdraft.export.checks",
    "ExportValidationError": "quickdraft.export.validate",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quickdraft.export' has no attribute {name!r}")
