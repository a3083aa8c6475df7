"""IOBinding for graphs that are rebound on every call.

A dynamic-cache decoder step (:class:`quickdraft.ort_backend.model.OrtModel`) and the cache
slicer bind new tensors on every call: the previous step's ``present`` caches as this
step's ``past``, fresh outputs for the new ones, two tensors per layer each way.
:class:`Binder` keeps one ``IOBinding`` per session, the device description and the NumPy
arrays bound by reference, so callers bind by name without repeating that bookkeeping. It
uses ONNX Runtime's public Python API only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["Binder", "python_ortvalue"]


def python_ortvalue(value):
    """A Python ``onnxruntime.OrtValue`` (values that already are one pass through)."""
    import onnxruntime as ort

    return value if isinstance(value, ort.OrtValue) else ort.OrtValue(value)


class Binder:
    """Bind inputs and outputs of one session's runs; ``run()`` then ``outputs()``.

    ``device`` (a :class:`quickdraft.ort_backend.device.Device`) is where device-bound
    tensors live; host-bound ones are on the CPU. Bindings stay until rebound by name or
    cleared; arrays bound from NumPy are kept alive until their name is bound again.
    """

    def __init__(self, session, device):
        self.session = session
        self.device = device
        self.binding = session.io_binding()
        self._keep: dict[str, np.ndarray] = {}  # NumPy arrays bound by reference

    def bind_array(self, name: str, array: np.ndarray) -> None:
        """Bind a host array (contiguous, the input's type) by reference."""
        self._keep[name] = array
        self.binding.bind_cpu_input(name, array)

    def bind_pointer(self, name: str, dtype, shape: Sequence[int], pointer: int) -> None:
        """Bind ``shape`` elements of ``dtype`` at ``pointer`` on the device."""
        self.binding.bind_input(name, self.device.kind, self.device.device_id, dtype,
                                list(shape), pointer)

    def bind_value(self, name: str, value) -> None:
        """Bind an OrtValue as an input."""
        self.binding.bind_ortvalue_input(name, python_ortvalue(value))

    def bind_output(self, name: str, host: bool = False) -> None:
        """Let the run allocate output ``name`` on the device (or on the host)."""
        if host:
            self.binding.bind_output(name, "cpu")
        else:
            self.binding.bind_output(name, self.device.kind, self.device.device_id)

    def clear_outputs(self) -> None:
        self.binding.clear_binding_outputs()

    def run(self, run_options=None) -> None:
        self.session.run_with_iobinding(self.binding, run_options)

    def outputs(self) -> list:
        """The last run's outputs in binding order (OrtValues)."""
        return self.binding.get_outputs()
