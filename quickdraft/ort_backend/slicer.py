"""Rolling KV caches back on the device: a tiny ONNX ``Slice`` graph run through IOBinding.

The optimum decoder's caches are dynamic: ``present`` is ``concat(past, new)``, a fresh
[batch, kv_heads, seq, head_dim] tensor per step. After a rejection the caches must keep
only their first ``length`` positions. Along the sequence axis of that layout the kept
part is strided (one run of ``length * head_dim`` values per head), so a raw pointer with
a shorter shape cannot describe it; something has to copy it.

The copy runs where the caches live: one session holding one ``Slice`` node per cache
tensor (all layers, keys and values, in one ``run``), on the same execution provider as
the model, with every input and output bound through IOBinding. No cache byte crosses to
the host; only ``length`` (one int64, read on the host by Slice's CPU-side ``ends`` input)
goes in. The same code runs on the CPU EP, so CI exercises the path the GPU takes. Its cost
is one device copy of the kept prefix, the same order as the ``concat`` every decoder step
already does; graphs with static (preallocated) caches need neither.

The graph is written here as ONNX protobuf bytes by a small encoder, so the runtime needs
``onnxruntime`` alone (not the ``onnx`` package).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

__all__ = ["slice_model_bytes", "CacheSlicer"]

_INT64 = 7  # onnx.TensorProto.INT64
_OPSET = 13  # Slice with starts/ends/axes as inputs (since opset 10)
_IR_VERSION = 8


# -- protobuf wire format: just what an ONNX ModelProto of a few nodes needs -------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s are ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)  # wire type 0


def _field_bytes(number: int, payload: bytes | str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload  # wire type 2


def _value_info(name: str, elem_type: int, dims: Sequence[int | str]) -> bytes:
    # ValueInfoProto{name=1, type=2}; TypeProto{tensor_type=1}; Tensor{elem_type=1, shape=2};
    # TensorShapeProto{dim=1}; Dimension{dim_value=1, dim_param=2}
    shape = b"".join(
        _field_bytes(1, _field_int(1, d) if isinstance(d, int) else _field_bytes(2, d))
        for d in dims
    )
    tensor = _field_int(1, elem_type) + _field_bytes(2, shape)
    return _field_bytes(1, name) + _field_bytes(2, _field_bytes(1, tensor))


def _int64_initializer(name: str, values: Sequence[int]) -> bytes:
    # TensorProto{dims=1, data_type=2, name=8, raw_data=9}
    raw = struct.pack(f"<{len(values)}q", *values)
    return (_field_int(1, len(values)) + _field_int(2, _INT64) + _field_bytes(8, name)
            + _field_bytes(9, raw))


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str) -> bytes:
    # NodeProto{input=1, output=2, name=3, op_type=4}
    return (b"".join(_field_bytes(1, i) for i in inputs)
            + b"".join(_field_bytes(2, o) for o in outputs)
            + _field_bytes(3, name) + _field_bytes(4, op))


def slice_model_bytes(count: int, elem_type: int, rank: int = 4, axis: int = 2) -> bytes:
    """An ONNX model: inputs ``ends`` (int64 [1]) and ``x0 .. x{count-1}`` (``elem_type``,
    rank ``rank``), outputs ``y{j} = x{j}[..., :ends, ...]`` along ``axis``."""
    if count < 1:
        raise ValueError("need at least one tensor to slice")
    x_dims = [f"d{k}" for k in range(rank)]
    y_dims = [d if k != axis else "length" for k, d in enumerate(x_dims)]
    nodes = b"".join(
        _field_bytes(1, _node("Slice", [f"x{j}", "starts", "ends", "axes"], [f"y{j}"], f"s{j}"))
        for j in range(count)
    )
    inits = _field_bytes(5, _int64_initializer("starts", [0]))
    inits += _field_bytes(5, _int64_initializer("axes", [axis]))
    inputs = _field_bytes(11, _value_info("ends", _INT64, [1]))
    inputs += b"".join(
        _field_bytes(11, _value_info(f"x{j}", elem_type, x_dims)) for j in range(count)
    )
    outputs = b"".join(
        _field_bytes(12, _value_info(f"y{j}", elem_type, y_dims)) for j in range(count)
    )
    # GraphProto{node=1, name=2, initializer=5, input=11, output=12}
    graph = nodes + _field_bytes(2, "quickdraft_kv_slice") + inits + inputs + outputs
    opset = _field_int(2, _OPSET)  # OperatorSetIdProto{domain=1 (default ""), version=2}
    # ModelProto{ir_version=1, producer_name=2, graph=7, opset_import=8}
    return (_field_int(1, _IR_VERSION) + _field_bytes(2, "quickdraft")
            + _field_bytes(7, graph) + _field_bytes(8, opset))


class CacheSlicer:
    """Keep the first ``length`` positions of a list of cache tensors, on their device.

    ``session_options`` default to one intra-op thread (see
    :func:`quickdraft.ort_backend.device.helper_options`).
    """

    def __init__(self, count: int, elem_type: int, device, session_options=None):
        from quickdraft.ort_backend.binding import Binder
        from quickdraft.ort_backend.device import create_session, helper_options

        self.count = count
        self.device = device  # a quickdraft.ort_backend.device.Device
        options = session_options if session_options is not None else helper_options()
        self.session = create_session(slice_model_bytes(count, elem_type), device, options,
                                      name="the cache slicing graph")
        self._binder = Binder(self.session, device)
        self._inputs = [f"x{j}" for j in range(count)]
        self._outputs = [f"y{j}" for j in range(count)]
        self._ends = np.zeros(1, dtype=np.int64)  # Slice reads ends on the host on every EP

    def __call__(self, values: Sequence, length: int) -> list:
        """values: ``count`` OrtValues [b, h, S, d] -> OrtValues [b, h, length, d]."""
        if len(values) != self.count:
            raise ValueError(f"expected {self.count} cache tensors, got {len(values)}")
        b = self._binder
        b.clear_outputs()  # fresh outputs: the last call's are caches in use
        self._ends[0] = length
        b.bind_array("ends", self._ends)  # rebound: a binding may copy what it binds
        for name, value in zip(self._inputs, values):
            b.bind_value(name, value)
        for name in self._outputs:
            b.bind_output(name)
        b.run()
        return b.outputs()
