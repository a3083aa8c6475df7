"""Choosing the ONNX Runtime execution provider: CUDA where asked for and present, else CPU.

The library stays silent: a fallback from ``auto`` to the CPU is returned as a note for
the caller (the CLI prints it on stderr).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

__all__ = [
    "ATTENTION_KERNELS",
    "DEFAULT_ATTENTION",
    "check_attention",
    "DEVICES",
    "CudaUnavailableError",
    "Device",
    "resolve_device",
    "session_options",
    "helper_options",
    "create_session",
]

DEVICES = ("auto", "cuda", "cpu")

# GroupQueryAttention's CUDA kernel -> the environment ONNX Runtime reads when a session's
# kernels are made (no session or provider option selects XQA)
ATTENTION_KERNELS: dict[str, dict[str, str]] = {
    "auto": {},  # the environment as it is: onnxruntime picks (XQA for fp16 decode steps)
    "xqa": {"ORT_ENABLE_XQA": "1"},  # TensorRT-LLM's decode kernel; other steps as "auto"
    # cuDNN SDPA; its logits differ in the last bits between runs, so a seeded sampled
    # output can change (xqa, auto and flash repeat themselves)
    "cudnn": {"ORT_ENABLE_XQA": "0", "ORT_ENABLE_CUDNN_FLASH_ATTENTION": "1"},
    "flash": {"ORT_ENABLE_XQA": "0", "ORT_ENABLE_CUDNN_FLASH_ATTENTION": "0",
              "ORT_DISABLE_FLASH_ATTENTION": "0"},  # onnxruntime's flash attention
}
DEFAULT_ATTENTION = "cudnn"  # the models' kernel: the fastest target step measured (H200)
_environment_lock = threading.Lock()  # the process environment is shared by all threads

_preloaded = False


class CudaUnavailableError(RuntimeError):
    """CUDA was asked for, but this onnxruntime cannot run on a CUDA device here."""


@dataclass(frozen=True)
class Device:
    """Where a session runs: ``kind`` "cpu" or "cuda" (an ORT ``device_type``) and an id."""

    kind: str = "cpu"
    device_id: int = 0

    def provider_list(self, cuda_options: dict | None = None) -> list:
        """Execution providers for a session here; ``cuda_options`` are extra CUDA provider
        options (e.g. ``enable_cuda_graph``), merged over ``device_id``."""
        if self.kind == "cuda":
            options = {"device_id": str(self.device_id)}
            options.update({k: str(v) for k, v in (cuda_options or {}).items()})
            return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
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


def session_options(threads: int | None = None):
    """Session options shared by quickdraft's sessions: full graph optimisation, quiet logs.

    ``threads``: intra-op threads of a CPU session (None: ONNX Runtime's default, one per
    physical core).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the library does not print
    if threads is not None:
        if int(threads) != threads or threads < 1:
            raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
        options.intra_op_num_threads = int(threads)
    return options


def helper_options():
    """Options for the small helper graphs (cache slicing, verification): one intra-op
    thread. Their operators are too small to split, and a session's idle worker threads
    spin for a while after each run, on the cores the next model call needs."""
    return session_options(threads=1)


def check_attention(attention: str) -> str:
    """``attention`` if it names one of :data:`ATTENTION_KERNELS`, else a ValueError."""
    if not isinstance(attention, str) or attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)} (the "
                         f"CUDA kernel of GroupQueryAttention), got {attention!r}")
    return attention


@contextlib.contextmanager
def attention_environment(attention: str):
    """The process environment with ``attention``'s settings while a session is made,
    restored after; one session at a time."""
    changes = ATTENTION_KERNELS[check_attention(attention)]
    if not changes:
        yield
        return
    with _environment_lock:
        saved = {k: os.environ.get(k) for k in changes}
        os.environ.update(changes)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def create_session(model, device: Device, options=None, cuda_options: dict | None = None,
                   name: str | None = None, attention: str = DEFAULT_ATTENTION):
    """An ``InferenceSession`` for ``model`` (a path or serialized bytes) on ``device``;
    on CUDA its GroupQueryAttention nodes use ``attention``'s kernel
    (:data:`ATTENTION_KERNELS`).

    Raises :class:`CudaUnavailableError` when CUDA is asked for but its execution provider
    is missing or does not start, and RuntimeError (naming ``name`` or the path) when ONNX
    Runtime cannot load the model.
    """
    import onnxruntime as ort

    what = name or (str(model) if not isinstance(model, bytes) else "the model")
    if device.kind == "cuda":
        problem = cuda_problem()
        if problem is not None:
            raise CudaUnavailableError(f"CUDA was requested but {problem}")
    source = model if isinstance(model, bytes) else str(model)
    check_attention(attention)
    try:
        with attention_environment(attention if device.kind == "cuda" else "auto"):
            session = ort.InferenceSession(
                source, sess_options=options if options is not None else session_options(),
                providers=device.provider_list(cuda_options))
    except Exception as e:  # ORT raises its own exception types
        raise RuntimeError(
            f"onnxruntime could not load {what} on {device}: {type(e).__name__}: {e}"
        ) from e
    if session.get_providers()[0] != device.provider:
        raise CudaUnavailableError(
            f"the CUDA execution provider did not start for {what} (providers in use: "
            f"{session.get_providers()}); check the CUDA and cuDNN libraries"
        )
    return session
