"""One upload for all of a call's small inputs.

A captured CUDA graph reads its inputs from fixed device addresses, so every call first
copies its new inputs (token ids, the attention mask, a sampled chain's uniforms) into
the buffers bound there. Each ``OrtValue.update_inplace`` is a synchronous copy with a
fixed cost (about 12-16 us on an H200, whatever its few kilobytes; five of them took
45-57 us, one of five times the bytes 9-20 us: ``benchmarks/upload_cost.py``).
:class:`UploadBlock` lays a call's host arrays out in one buffer whose device copy has the
same layout, each input bound at its address there, so the call makes one copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from quickdraft.ort_backend.device import Device

__all__ = ["UploadBlock"]

# bytes between the starts of two arrays of a block (a multiple of every element size)
ALIGN = 256


class UploadBlock:
    """Host arrays of any shapes and types in one byte buffer, and that buffer on a device.

    ``fields`` maps a name to (shape, dtype). ``block[name]`` is the host array to write;
    :meth:`upload` copies the whole block to the device in one call (on the CPU the
    device buffer is the host memory itself and nothing is copied); :meth:`bind` binds
    an array, or a part of it, as a session input at its device address, which stays the
    same for the block's life.
    """

    def __init__(self, fields: Mapping[str, tuple[Sequence[int], object]], device: Device):
        import onnxruntime as ort

        if not fields:
            raise ValueError("an upload block needs at least one array")
        self.device = device
        spans = {}  # name -> (offset, bytes, dtype, shape)
        size = 0
        for name, (shape, dtype) in fields.items():
            dtype = np.dtype(dtype)
            if ALIGN % dtype.itemsize:
                raise ValueError(f"{name}: elements of {dtype.itemsize} bytes do not align "
                                 f"in blocks of {ALIGN}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            spans[name] = size, nbytes, dtype, tuple(shape)
            size += -(-max(nbytes, 1) // ALIGN) * ALIGN  # rounded up to the alignment
        self._host = np.zeros(size, dtype=np.uint8)  # [bytes]
        self._offsets = {name: offset for name, (offset, *_) in spans.items()}
        self._arrays = {name: self._host[offset : offset + nbytes].view(dtype).reshape(shape)
                        for name, (offset, nbytes, dtype, shape) in spans.items()}
        # on the CPU an OrtValue made from a NumPy array uses that array's memory
        self._value = ort.OrtValue.ortvalue_from_numpy(self._host, device.kind,
                                                       device.device_id)
        self.on_device = device.kind != "cpu"

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    @property
    def nbytes(self) -> int:
        """The bytes one upload copies."""
        return int(self._host.nbytes)

    def address(self, name: str, index: int = 0) -> int:
        """The device address of element ``index`` (flat, C order) of array ``name``."""
        array = self._arrays[name]
        if not 0 <= index < array.size:
            raise IndexError(f"{name} has {array.size} elements, not {index + 1}")
        return self._value.data_ptr() + self._offsets[name] + index * array.itemsize

    def bind(self, io, input_name: str, name: str, shape: Sequence[int] | None = None,
             index: int = 0) -> None:
        """Bind ``shape`` elements of array ``name`` from element ``index`` (default: the
        whole array) as input ``input_name`` of the IOBinding ``io``."""
        array = self._arrays[name]
        shape = array.shape if shape is None else tuple(shape)
        count = int(np.prod(shape, dtype=np.int64))
        if index + count > array.size:
            raise IndexError(f"{count} elements from {index} overrun {name}'s {array.size}")
        io.bind_input(input_name, self.device.kind, self.device.device_id, array.dtype.type,
                      list(shape), self.address(name, index))

    def upload(self) -> None:
        """Copy every host array to the device, in one call (nothing to do on the CPU)."""
        if self.on_device:
            self._value.update_inplace(self._host)
