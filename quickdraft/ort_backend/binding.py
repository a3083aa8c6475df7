"""IOBinding for graphs that must be rebound on every call, at a few hundred nanoseconds a
tensor.

A dynamic-cache decoder step (:class:`quickdraft.ort_backend.model.OrtModel`) and the cache
slicer bind new tensors on every call: the previous step's ``present`` caches as this
step's ``past``, fresh outputs for the new ones, two tensors per layer each way. ONNX
Runtime's Python ``IOBinding`` wraps every such call: it rebuilds a device object for each
output it binds, wraps each output in a new Python ``OrtValue`` and runs its graph-capture
checks, 1 to 3 microseconds a tensor, tens of microseconds a step, as much as the step
itself on a small draft model.

:class:`Binder` makes the same calls on the compiled binding object that ``IOBinding``
wraps (``IOBinding._iobinding``; the session's own ``_sess``), with its two device
descriptions made once; the values it hands back are ONNX Runtime's compiled ``OrtValue``
objects, which it also accepts (as well as Python ``OrtValue`` objects). Where an
onnxruntime lacks those attributes it makes the public calls instead (``native`` is then
False); both give the same bindings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["Binder", "python_ortvalue"]


def _raw(value):
    """The compiled OrtValue inside a Python OrtValue (or the value itself)."""
    return getattr(value, "_ortvalue", value)


def python_ortvalue(value):
    """A Python ``onnxruntime.OrtValue`` for a compiled one (or the value itself)."""
    import onnxruntime as ort

    return value if isinstance(value, ort.OrtValue) else ort.OrtValue(value)


class Binder:
    """Bind inputs and outputs of one session's runs; ``run()`` then ``outputs()``.

    ``device`` (a :class:`quickdraft.ort_backend.device.Device`) is where device-bound
    tensors live; host-bound ones are on the CPU. Bindings stay until rebound by name or
    cleared; arrays bound from NumPy are kept alive until their name is bound again.
    """

    def __init__(self, session, device, *, native: bool | None = None):
        import onnxruntime as ort

        self.session = session
        self.device = device
        self.binding = session.io_binding()
        self._keep: dict[str, np.ndarray] = {}  # NumPy arrays bound by reference
        raw = getattr(self.binding, "_iobinding", None)
        sess = getattr(session, "_sess", None)
        make = getattr(getattr(ort, "OrtDevice", None), "make", None)
        can = raw is not None and sess is not None and make is not None
        self.native = can if native is None else bool(native and can)
        if self.native:
            self._io = raw
            self._run = sess.run_with_iobinding
            self._device = make(device.kind, device.device_id)._get_c_device()
            self._host = make("cpu", 0)._get_c_device()

    def bind_array(self, name: str, array: np.ndarray) -> None:
        """Bind a host array (contiguous, the input's type) by reference."""
        self._keep[name] = array
        if self.native:
            self._io.bind_input(name, array)
        else:
            self.binding.bind_cpu_input(name, array)

    def bind_pointer(self, name: str, dtype, shape: Sequence[int], pointer: int) -> None:
        """Bind ``shape`` elements of ``dtype`` at ``pointer`` on the device."""
        if self.native:
            self._io.bind_input(name, self._device, dtype, list(shape), pointer)
        else:
            self.binding.bind_input(name, self.device.kind, self.device.device_id, dtype,
                                    list(shape), pointer)

    def bind_value(self, name: str, value) -> None:
        """Bind an OrtValue (compiled or Python) as an input."""
        if self.native:
            self._io.bind_ortvalue_input(name, _raw(value))
        else:
            self.binding.bind_ortvalue_input(name, python_ortvalue(value))

    def bind_output(self, name: str, host: bool = False) -> None:
        """Let the run allocate output ``name`` on the device (or on the host)."""
        if self.native:
            self._io.bind_output(name, self._host if host else self._device)
        elif host:
            self.binding.bind_output(name, "cpu")
        else:
            self.binding.bind_output(name, self.device.kind, self.device.device_id)

    def clear_outputs(self) -> None:
        if self.native:
            self._io.clear_binding_outputs()
        else:
            self.binding.clear_binding_outputs()

    def run(self, run_options=None) -> None:
        if self.native:
            self._run(self._io, run_options)
        else:
            self.session.run_with_iobinding(self.binding, run_options)

    def outputs(self) -> list:
        """The last run's outputs in binding order (compiled or Python OrtValues)."""
        if self.native:
            values = self._io.get_outputs()
            return [values[i] for i in range(len(values))]
        return self.binding.get_outputs()
