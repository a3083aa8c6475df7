"""CUDA streams of a chosen priority for ONNX Runtime sessions.

ONNX Runtime's CUDA execution provider runs a session on a stream it creates, unless the
provider options name one (``has_user_compute_stream``, ``user_compute_stream``). A
stream made here is non-blocking, like ONNX Runtime's own, and has the default priority
("normal") or the device's greatest ("high"): when two models run at once (pipelined
decoding), the GPU's block scheduler starts the high-priority stream's blocks first. The
streams live as long as the process: a session holds its stream's handle, and a stream
costs nothing idle.
"""

from __future__ import annotations

import ctypes
import threading

__all__ = ["STREAM_PRIORITIES", "StreamError", "cuda_stream_options", "stream_priority_range"]

# "default": ONNX Runtime makes the session's stream; "normal": one made here, of the
# default priority (the same scheduling as ONNX Runtime's, through this path)
STREAM_PRIORITIES = ("default", "normal", "high")

_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_NON_BLOCKING = 0x01  # cudaStreamNonBlocking
_lock = threading.Lock()
_streams: dict[tuple[int, str], int] = {}  # (device id, priority) -> cudaStream_t


class StreamError(RuntimeError):
    """A CUDA stream of the asked priority cannot be made here."""


def _cudart():
    """The CUDA runtime ONNX Runtime loaded (its NVIDIA packages, after preload)."""
    from quickdraft.ort_backend.device import cuda_problem

    problem = cuda_problem()  # also loads the NVIDIA packages' libraries
    if problem is not None:
        raise StreamError(f"a CUDA stream needs CUDA, but {problem}")
    problems = []
    for name in _CUDART_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            problems.append(str(e))
    raise StreamError("no CUDA runtime library (libcudart) could be loaded for a stream of "
                      "another priority: " + "; ".join(problems) + ". Install onnxruntime-gpu "
                      "with its NVIDIA packages, or use stream priority 'default'")


def _check(code: int, what: str) -> None:
    if code != 0:
        raise StreamError(f"{what} failed with CUDA error {code}; use stream priority "
                          "'default' (the streams ONNX Runtime makes)")


def stream_priority_range(device_id: int = 0) -> tuple[int, int]:
    """The device's (least, greatest) stream priorities; a greater priority is a smaller
    number (0 and -5 on recent GPUs)."""
    rt = _cudart()
    _check(rt.cudaSetDevice(ctypes.c_int(device_id)), f"cudaSetDevice({device_id})")
    least, greatest = ctypes.c_int(), ctypes.c_int()
    _check(rt.cudaDeviceGetStreamPriorityRange(ctypes.byref(least), ctypes.byref(greatest)),
           "cudaDeviceGetStreamPriorityRange")
    return least.value, greatest.value


def cuda_stream_options(priority: str, device_id: int = 0) -> dict[str, str]:
    """CUDA provider options that run a session on this process's stream of ``priority``
    (one of :data:`STREAM_PRIORITIES`) on device ``device_id``; {} for "default"."""
    if priority not in STREAM_PRIORITIES:
        raise ValueError(f"stream priority must be one of {', '.join(STREAM_PRIORITIES)}, "
                         f"got {priority!r}")
    if priority == "default":
        return {}
    with _lock:
        stream = _streams.get((device_id, priority))
        if stream is None:
            least, greatest = stream_priority_range(device_id)
            value = greatest if priority == "high" else least  # least: the default, 0
            rt = _cudart()
            handle = ctypes.c_void_p()
            _check(rt.cudaStreamCreateWithPriority(ctypes.byref(handle),
                                                   ctypes.c_uint(_NON_BLOCKING),
                                                   ctypes.c_int(value)),
                   f"cudaStreamCreateWithPriority({priority})")
            stream = _streams[(device_id, priority)] = int(handle.value or 0)
    return {"has_user_compute_stream": "1", "user_compute_stream": str(stream)}
