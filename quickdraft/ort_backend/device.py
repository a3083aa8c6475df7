"""Choosing the ONNX Runtime execution provider: CUDA where asked for and present, else CPU.

The library stays silent: a fallback from ``auto`` to the CPU is returned as a note for
the caller (the CLI prints it on stderr).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEVICES", "CudaUnavailableError", "Device", "resolve_device", "session_options"]

DEVICES = ("auto", "cuda", "cpu")

_preloaded = False


class CudaUnavailableError(RuntimeError):
    """CUDA was asked for, but this onnxruntime cannot run on a CUDA device here."""


@dataclass(frozen=True)
class Device:
    """Where a session runs: ``kind`` "cpu" or "cuda" (an ORT ``device_type``) and an id."""

    kind: str = "cpu"
    device_id: int = 0

    @property
    def providers(self) -> list:
        if self.kind == "cuda":
            return [("CUDAExecutionProvider", {"device_id": self.device_id}),
                    "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    @property
    def provider(self) -> str:
        return "CUDAExecutionProvider" if self.kind == "cuda" else "CPUExecutionProvider"

    def __str__(self) -> str:
        return f"cuda:{self.device_id}" if self.kind == "cuda" else "cpu"


def _preload_cuda() -> None:
    """Load CUDA and cuDNN from the pip-installed NVIDIA packages (onnxruntime-gpu >= 1.21)."""
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # missing NVIDIA wheels: the session start reports it
            pass


def cuda_problem() -> str | None:
    """Why CUDA cannot be used (None when the CUDA execution provider is available)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            f"this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider; "
            "install onnxruntime-gpu on a machine with an NVIDIA GPU"
        )
    _preload_cuda()
    return None


def resolve_device(device: str = "auto", device_id: int = 0) -> tuple[Device, str | None]:
    """``"auto"``, ``"cuda"`` or ``"cpu"`` -> (Device, note).

    ``cuda`` raises :class:`CudaUnavailableError` when the CUDA provider is missing;
    ``auto`` falls back to the CPU and returns a note saying why.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return Device("cpu"), None
    problem = cuda_problem()
    if problem is None:
        return Device("cuda", device_id), None
    if device == "cuda":
        raise CudaUnavailableError(f"CUDA was requested but {problem}")
    return Device("cpu"), f"CUDA is not available ({problem}); running on the CPU"


def session_options():
    """Session options shared by quickdraft's sessions: full graph optimisation, quiet logs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the library does not print
    return options
