"""Rolling KV caches back on the device: a tiny ONNX ``Slice`` graph run through IOBinding.

After a rejection the dynamic caches ([batch, kv_heads, seq, head_dim], ``present =
concat(past, new)``) keep only their first ``length`` positions; along axis 2 that part is
strided, so it is copied. One session holds a ``Slice`` node per cache tensor on the model's
execution provider, every input and output bound through IOBinding: no cache byte crosses to
the host, only ``length`` (Slice reads ``ends`` on the host). The CPU EP runs the same path as
the GPU. The graph is built with ``onnx.helper`` (the ``ort`` extra), imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["slice_model_bytes", "CacheSlicer"]

_OPSET = 13  # Slice with starts/ends/axes as inputs (since opset 10)
_IR_VERSION = 8  # what every supported onnxruntime reads (onnx's default may be newer)


def slice_model_bytes(count: int, elem_type: int, rank: int = 4, axis: int = 2) -> bytes:
    """An ONNX model: inputs ``ends`` (int64 [1]) and ``x0 .. x{count-1}`` (``elem_type``,
    rank ``rank``), outputs ``y{j} = x{j}[..., :ends, ...]`` along ``axis``."""
    if count < 1:
        raise ValueError("need at least one tensor to slice")
    from onnx import TensorProto, helper, numpy_helper

    x_dims = [f"d{k}" for k in range(rank)]
    y_dims = [d if k != axis else "length" for k, d in enumerate(x_dims)]
    nodes = [helper.make_node("Slice", [f"x{j}", "starts", "ends", "axes"], [f"y{j}"],
                              name=f"s{j}") for j in range(count)]
    inits = [numpy_helper.from_array(np.array([0], dtype=np.int64), "starts"),
             numpy_helper.from_array(np.array([axis], dtype=np.int64), "axes")]
    inputs = [helper.make_tensor_value_info("ends", TensorProto.INT64, [1])]
    inputs += [helper.make_tensor_value_info(f"x{j}", elem_type, x_dims) for j in range(count)]
    outputs = [helper.make_tensor_value_info(f"y{j}", elem_type, y_dims) for j in range(count)]
    graph = helper.make_graph(nodes, "quickdraft_kv_slice", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, producer_name="quickdraft", ir_version=_IR_VERSION,
                              opset_imports=[helper.make_opsetid("", _OPSET)])
    return model.SerializeToString()


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
