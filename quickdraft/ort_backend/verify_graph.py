"""Verification on the device: speculative sampling's acceptance rule as an ONNX graph.

:func:`build_verify_graph` writes :func:`quickdraft.verification.verify` (exact rule,
lenience 1) with standard ONNX operators, after the same sampling adjustments as
:func:`quickdraft.sampling.adjust_logits` (temperature, then top-k, then top-p; temperature
0 is greedy). Run next to the models, it reads the target's logits where the target wrote
them, so only two integers, n and the next token, come back to the host per iteration.

Inputs (``compute`` is the graph's float type, float32 or float64):

* ``target_logits`` [1, S, V] (the model's ``logits`` output as is, any S >= gamma + 1;
  the last gamma + 1 rows are used) in the model's dtype, or ``target_probs``
  [gamma + 1, V] in ``compute`` when built with ``target_input="probs"``;
* ``draft_probs`` [gamma, V], ``accept_uniforms`` [gamma], ``sample_uniform`` [1] in
  ``compute``; ``draft_tokens`` [gamma] int64.

Outputs: ``n`` [1] int64 (accepted draft tokens), ``next_token`` [1] int64 and ``beta``
[gamma] in ``compute``: beta_i = sum_x min(p_i(x), q_i(x)), the acceptance probability at
each draft position (:func:`quickdraft.theory.beta`), for the statistics.

Greedy graphs (temperature 0, from logits) decide on the target's argmax tokens alone, so
they take only ``target_logits`` and ``draft_tokens`` and return ``choices`` [gamma] int64
(the target's argmax at each draft position) in place of ``beta``: beta_i is then
q_i(choices_i), which :class:`DeviceVerifier` reads from the host's q. No q row crosses to
the device.

The decisions are those of ``verify``, step for step: token i is accepted while
``u_i * q_i(x_i) < p_i(x_i)``; n is the first rejection (gamma if none); the next token is
drawn from ``norm(max(0, p_n - q_n))`` with q padded by a zero row at gamma (so the bonus
comes from p_gamma), falling back to p_n when that residual sums to at most 1e-12, by
inverse CDF: the count of cdf entries <= u * total, clamped to the last index of positive
weight. Only rounding differs (float32 against NumPy's float64), so the two agree except
where a uniform lies within rounding of a decision boundary (tests/test_verify_graph.py
states the margin it keeps).

:class:`GraphVerifier` is the :class:`quickdraft.protocols.Verifier` built on it: plugged
into :func:`quickdraft.generation.speculative_stream` (``verifier=``), it replaces
:func:`quickdraft.generation.host_verify` and nothing else of the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quickdraft.manifest import ONNX_ELEMENT_TYPES
from quickdraft.ort_backend.device import Device, create_session, helper_options
from quickdraft.protocols import (
    Candidates,
    DecodeState,
    Verdict,
    advance,
    rewind_to_common_prefix,
)
from quickdraft.sampling import SamplingConfig
from quickdraft.verification import RESIDUAL_EPS

__all__ = [
    "build_verify_graph",
    "DeviceVerifier",
    "GraphVerifier",
    "advance_device",
    "RESIDUAL_EPS",
]

_INT64_MAX = np.iinfo(np.int64).max
_COMPUTE = {"float32": (np.float32, 1), "float64": (np.float64, 11)}
# target_logits types: the models' logits (fp16 and fp32; bf16 has no NumPy type) and fp64
_LOGITS_TYPES = {"fp32": ONNX_ELEMENT_TYPES["fp32"], "fp16": ONNX_ELEMENT_TYPES["fp16"],
                 "fp64": 11}
_LOGITS_NP = {"fp32": np.float32, "fp16": np.float16, "fp64": np.float64}
OPSET = 17


class _Builder:
    """A tiny helper over onnx.helper: unique names, constants, one node per call."""

    def __init__(self, np_type):
        self.nodes: list = []
        self.inits: list = []
        self.np_type = np_type
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, dtype=None, hint="c") -> str:
        from onnx import numpy_helper

        arr = np.asarray(value, dtype=dtype if dtype is not None else self.np_type)
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def fill_like(self, x: str, value: float) -> str:
        """A tensor shaped like ``x`` filled with ``value`` (in the compute type)."""
        from onnx import numpy_helper

        fill = numpy_helper.from_array(np.asarray([value], dtype=self.np_type))
        return self.op("ConstantOfShape", [self.op("Shape", [x])], value=fill)

    def zeros_like(self, x: str) -> str:
        return self.fill_like(x, 0.0)

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs):
        from onnx import helper

        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs


def _adjust(b: _Builder, z: str, vocab: int, sampling: SamplingConfig) -> str:
    """adjust_logits for sampling (temperature > 0): logits z [R, V] -> probs [R, V]."""
    if sampling.temperature != 1.0:
        z = b.op("Div", [z, b.const(sampling.temperature)])
    if 0 < sampling.top_k < vocab:
        # keep exactly k: TopK breaks ties towards the lower index, like NumPy's stable sort
        _, idx = b.op("TopK", [z, b.const([sampling.top_k], np.int64)], n_out=2,
                      axis=-1, largest=1, sorted=1)
        keep = b.op("ScatterElements", [b.zeros_like(z), idx, b.fill_like(idx, 1.0)], axis=-1)
        z = b.op("Where", [b.op("Greater", [keep, b.const(0.5)]), z, b.const(-np.inf)])
    probs = b.op("Softmax", [z], axis=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = b.op("TopK", [probs, b.const([vocab], np.int64)], n_out=2,
                               axis=-1, largest=1, sorted=1)
        cum = b.op("CumSum", [sorted_p, b.const(-1, np.int64)])
        before = b.op("Sub", [cum, sorted_p])  # mass of the more likely tokens
        keep_sorted = b.op("Cast", [b.op("Less", [before, b.const(sampling.top_p)])],
                           to=_COMPUTE[np.dtype(b.np_type).name][1])
        keep = b.op("ScatterElements", [b.zeros_like(probs), order, keep_sorted], axis=-1)
        kept = b.op("Where", [b.op("Greater", [keep, b.const(0.5)]), probs, b.const(0.0)])
        total = b.op("ReduceSum", [kept, b.const([-1], np.int64)], keepdims=1)
        probs = b.op("Div", [kept, total])
    return probs


def build_verify_graph(
    gamma: int,
    vocab: int,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    logits_dtype: str = "fp32",
    compute: str = "float32",
    target_input: str = "logits",
):
    """The verification graph for ``gamma`` draft tokens over a vocabulary of ``vocab``.

    ``sampling`` must be the settings the draft probabilities were adjusted with
    (greedy when its temperature is 0). ``logits_dtype`` ("fp32", "fp16" or "fp64") is the
    type of ``target_logits``; ``compute`` ("float32" or "float64") the type everything
    else is computed in. Returns an ``onnx.ModelProto``.
    """
    import onnx
    from onnx import TensorProto, helper

    if int(gamma) != gamma or gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1, got {gamma}")
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    if compute not in _COMPUTE:
        raise ValueError(f"compute must be float32 or float64, got {compute!r}")
    if logits_dtype not in _LOGITS_TYPES:
        raise ValueError(f"logits_dtype must be fp32, fp16 or fp64, got {logits_dtype!r}")
    if target_input not in ("logits", "probs"):
        raise ValueError(f"target_input must be 'logits' or 'probs', got {target_input!r}")
    np_type, onnx_type = _COMPUTE[compute]
    b = _Builder(np_type)
    g1 = gamma + 1
    inputs = []
    if target_input == "logits":
        inputs.append(helper.make_tensor_value_info(
            "target_logits", _LOGITS_TYPES[logits_dtype], [1, "S", vocab]))
        z = b.op("Squeeze", ["target_logits", b.const([0], np.int64)])  # [S, V]
        z = b.op("Slice", [z, b.const([-g1], np.int64), b.const([_INT64_MAX], np.int64),
                           b.const([0], np.int64)])  # the last gamma + 1 rows
        z = b.op("Cast", [z], to=onnx_type)
        target = None
    else:
        inputs.append(helper.make_tensor_value_info("target_probs", onnx_type, [g1, vocab]))
        target = "target_probs"
    greedy = sampling.greedy and target is None
    if greedy:  # the decision needs only the draft tokens (see below)
        inputs.append(helper.make_tensor_value_info("draft_tokens", TensorProto.INT64, [gamma]))
    else:
        inputs += [
            helper.make_tensor_value_info("draft_probs", onnx_type, [gamma, vocab]),
            helper.make_tensor_value_info("draft_tokens", TensorProto.INT64, [gamma]),
            helper.make_tensor_value_info("accept_uniforms", onnx_type, [gamma]),
            helper.make_tensor_value_info("sample_uniform", onnx_type, [1]),
        ]
    x = "draft_tokens"
    x_col = b.op("Unsqueeze", [x, b.const([1], np.int64)])  # [gamma, 1]
    f32 = TensorProto.FLOAT
    if greedy:
        # one-hot p: accept x_i iff it is the target's argmax; the next token is the argmax
        # at n (what verify gives for one-hot p, any q supporting the draft tokens with
        # probability <= 1 and any uniforms: quickdraft.verification.verify_greedy)
        best = b.op("ArgMax", [z], axis=-1, keepdims=0)  # [gamma + 1] int64
        b.nodes.append(helper.make_node(
            "Slice", [best, b.const([0], np.int64), b.const([gamma], np.int64),
                      b.const([0], np.int64)], ["choices"]))  # [gamma]
        rejected = b.op("Cast", [b.op("Not", [b.op("Equal", ["choices", x])])], to=f32)
        padded = b.op("Concat", [rejected, b.const([1.0], np.float32)], axis=0)
        n = b.op("ArgMax", [padded], axis=0, keepdims=1)  # first rejection, or gamma
        b.nodes.append(helper.make_node("Identity", [n], ["n"]))
        b.nodes.append(helper.make_node("Gather", [best, n], ["next_token"], axis=0))
    else:
        if target is None:
            target = _adjust(b, z, vocab, sampling)  # p [gamma + 1, V]
        p = target
        q = "draft_probs"
        p_g = b.op("Slice", [p, b.const([0], np.int64), b.const([gamma], np.int64),
                             b.const([0], np.int64)])  # [gamma, V]
        p_x = b.op("Squeeze", [b.op("GatherElements", [p_g, x_col], axis=1),
                               b.const([1], np.int64)])  # [gamma]
        q_x = b.op("Squeeze", [b.op("GatherElements", [q, x_col], axis=1),
                               b.const([1], np.int64)])
        accepted = b.op("Less", [b.op("Mul", ["accept_uniforms", q_x]), p_x])  # u q < p
        rejected = b.op("Cast", [b.op("Not", [accepted])], to=f32)
        padded = b.op("Concat", [rejected, b.const([1.0], np.float32)], axis=0)
        n = b.op("ArgMax", [padded], axis=0, keepdims=1)  # [1]: first rejection, or gamma
        b.nodes.append(helper.make_node("Identity", [n], ["n"]))
        b.nodes.append(helper.make_node(
            "ReduceSum", [b.op("Min", [p_g, q]), b.const([-1], np.int64)], ["beta"],
            keepdims=0))  # [gamma]
        zero_row = b.const(np.zeros((1, vocab)))
        q_pad = b.op("Concat", [q, zero_row], axis=0)  # [gamma + 1, V]
        p_n = b.op("Gather", [p, n], axis=0)  # [1, V]
        q_n = b.op("Gather", [q_pad, n], axis=0)
        r = b.op("Max", [b.op("Sub", [p_n, q_n]), b.const(0.0)])
        total = b.op("ReduceSum", [r, b.const([-1], np.int64)], keepdims=1)  # [1, 1]
        empty = b.op("LessOrEqual", [total, b.const(RESIDUAL_EPS)])
        safe = b.op("Where", [empty, b.const(1.0), total])
        w = b.op("Where", [empty, p_n, b.op("Div", [r, safe])])  # [1, V]
        cdf = b.op("CumSum", [w, b.const(-1, np.int64)])
        cdf_total = b.op("Slice", [cdf, b.const([-1], np.int64),
                                   b.const([_INT64_MAX], np.int64), b.const([1], np.int64)])
        threshold = b.op("Mul", [b.op("Unsqueeze", ["sample_uniform", b.const([0], np.int64)]),
                                 cdf_total])  # [1, 1]
        below = b.op("Cast", [b.op("LessOrEqual", [cdf, threshold])], to=f32)
        count = b.op("ReduceSum", [below, b.const([-1], np.int64)], keepdims=0)  # [1]
        index = b.const(np.arange(vocab, dtype=np.float32)[None], np.float32)
        positive = b.op("Where", [b.op("Greater", [w, b.const(0.0)]), index,
                                  b.const(-1.0, np.float32)])
        last_positive = b.op("ReduceMax", [positive], axes=[-1], keepdims=0)  # [1]
        b.nodes.append(helper.make_node("Cast", [b.op("Min", [count, last_positive])],
                                        ["next_token"], to=TensorProto.INT64))
    outputs = [helper.make_tensor_value_info("n", TensorProto.INT64, [1]),
               helper.make_tensor_value_info("next_token", TensorProto.INT64, [1]),
               helper.make_tensor_value_info("choices", TensorProto.INT64, [gamma]) if greedy
               else helper.make_tensor_value_info("beta", onnx_type, [gamma])]
    graph = helper.make_graph(b.nodes, "quickdraft_verify", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="quickdraft")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class DeviceVerifier:
    """Runs a verification graph on a device; ``verifier(...) -> (n, next_token)``.

    The target logits may be a NumPy array ([S, V] or [1, S, V]) or an OrtValue
    [1, S, V] on the same device (the static model's ``append_device`` output), which is
    bound without a copy. The other inputs come from the host; n, the next token and the
    gamma betas are the only outputs read back (:meth:`run` returns all three).

    The inputs and the outputs live in buffers made once and bound once: a call writes the
    draft's tokens (and q and the uniforms, unless greedy) into host arrays, copies them
    into their device buffers (on the CPU they are the same memory), and rebinds only a new
    target (a static model hands over the same logits OrtValue for every step of a length);
    n, the next token and beta come back in host buffers.
    """

    def __init__(self, gamma: int, vocab: int, sampling: SamplingConfig = SamplingConfig(), *,
                 device: Device = Device("cpu"), logits_dtype: str = "fp32",
                 compute: str = "float32", target_input: str = "logits", options=None):
        import onnxruntime as ort

        self.gamma, self.vocab, self.sampling = int(gamma), int(vocab), sampling
        self.device = device
        self.compute = np.dtype(compute).type
        self.logits_np = _LOGITS_NP[logits_dtype] if logits_dtype in _LOGITS_NP else None
        self.target_input = target_input
        self.model = build_verify_graph(gamma, vocab, sampling, logits_dtype=logits_dtype,
                                        compute=compute, target_input=target_input)
        self.session = create_session(self.model.SerializeToString(), device,
                                      options if options is not None else helper_options(),
                                      name="the verification graph")
        self.binding = self.session.io_binding()
        g = self.gamma
        # the greedy graph reads the draft tokens alone and returns the target's choices
        self.greedy = [o.name for o in self.model.graph.output][-1] == "choices"
        # host arrays of the inputs
        self._inputs = {"draft_tokens": np.zeros(g, np.int64)}  # [gamma]
        if not self.greedy:
            self._inputs.update({
                "draft_probs": np.zeros((g, self.vocab), self.compute),  # [gamma, V]
                "accept_uniforms": np.zeros(g, self.compute),  # [gamma]
                "sample_uniform": np.zeros(1, self.compute),  # [1]
            })
        self._outputs = {"n": np.zeros(1, np.int64), "next_token": np.zeros(1, np.int64)}
        if self.greedy:
            self._outputs["choices"] = np.zeros(g, np.int64)  # [gamma]
        else:
            self._outputs["beta"] = np.zeros(g, self.compute)  # [gamma]
        # Inputs live on the graph's device, bound once: binding a host value to a CUDA
        # session copies it at bind time, so later writes would not be seen. A call writes
        # the host array and copies it into its device buffer (on the CPU the OrtValue is
        # the host array's memory: nothing to copy).
        self._on_device = device.kind != "cpu"
        self._in_values = {}
        for name, arr in self._inputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr, device.kind, device.device_id)
            self._in_values[name] = value
            self.binding.bind_ortvalue_input(name, value)
        self._values = []  # host OrtValues of the outputs (written by every run)
        for name, arr in self._outputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr)
            self._values.append(value)
            self.binding.bind_ortvalue_output(name, value)
        self._target_name = "target_logits" if target_input == "logits" else "target_probs"
        self._bound_target = None  # the OrtValue bound as the target, if one is

    def run(self, target, draft_probs, draft_tokens, accept_uniforms,
            sample_uniform) -> tuple[int, int, np.ndarray]:
        """(n, next_token, beta [gamma]) for one iteration."""
        g = self.gamma
        if self.greedy:
            n, token, choices = self.run_greedy(target, draft_tokens)
            # p_i is one-hot on choices_i: beta_i = sum_x min(p_i(x), q_i(x)) = q_i(choices_i)
            q = np.reshape(draft_probs, (g, self.vocab))
            return n, token, q[np.arange(g), choices].astype(self.compute)
        self._bind_target(target)
        inputs, out = self._inputs, self._outputs
        inputs["draft_tokens"][...] = np.reshape(draft_tokens, g)
        inputs["draft_probs"][...] = np.reshape(draft_probs, (g, self.vocab))
        inputs["accept_uniforms"][...] = np.reshape(accept_uniforms, g)
        inputs["sample_uniform"][0] = sample_uniform
        self._upload()
        self.session.run_with_iobinding(self.binding)
        return int(out["n"][0]), int(out["next_token"][0]), out["beta"].copy()

    def run_greedy(self, target, draft_tokens) -> tuple[int, int, np.ndarray]:
        """A greedy graph's (n, next_token, choices [gamma]): no q is needed, since the
        decision depends on the draft tokens and the target's argmax tokens alone."""
        if not self.greedy:
            raise ValueError("run_greedy needs a greedy verification graph (temperature 0)")
        self._bind_target(target)
        out = self._outputs
        self._inputs["draft_tokens"][...] = np.reshape(draft_tokens, self.gamma)
        self._upload()
        self.session.run_with_iobinding(self.binding)
        return int(out["n"][0]), int(out["next_token"][0]), out["choices"].copy()

    def _bind_target(self, target) -> None:
        """Bind the target's logits: a device OrtValue as is (rebound only when it is a new
        one), host arrays through a copy."""
        import onnxruntime as ort

        io = self.binding
        if isinstance(target, ort.OrtValue):
            if target is not self._bound_target:
                io.bind_ortvalue_input(self._target_name, target)
                self._bound_target = target
        else:
            arr = np.asarray(target)
            if self.target_input == "logits":
                arr = arr.reshape(1, -1, self.vocab).astype(self.logits_np, copy=False)
            else:
                arr = arr.astype(self.compute, copy=False)
            io.bind_cpu_input(self._target_name, np.ascontiguousarray(arr))
            self._bound_target = None

    def _upload(self) -> None:
        """Copy the host inputs into their device buffers (nothing to do on the CPU)."""
        if self._on_device:
            for name, value in self._in_values.items():
                value.update_inplace(self._inputs[name])

    def __call__(self, target, draft_probs, draft_tokens, accept_uniforms,
                 sample_uniform) -> tuple[int, int]:
        n, token, _ = self.run(target, draft_probs, draft_tokens, accept_uniforms,
                               sample_uniform)
        return n, token


def advance_device(state, ids: Sequence[int], min_new: int):
    """:func:`quickdraft.protocols.advance` returning the logits as the state has them:
    a device OrtValue [1, k, V] from a static state (no copy), else host rows [k, V]; at
    least the last ``min_new`` tokens are (re-)appended."""
    if not hasattr(state, "append_device"):
        return advance(state, ids, min_new)
    common = rewind_to_common_prefix(state, ids, min_new)
    return state.append_device(list(ids[common:]))


class GraphVerifier:
    """A :class:`quickdraft.protocols.Verifier` that decides with the verification graph.

    The target's logits stay where the target wrote them when its state can hand them over
    on the device (``append_device``: static models); other states give host logits, which
    the graph reads from the host. One :class:`DeviceVerifier` per (gamma, sampling) is
    built on first use (or ahead of time with :meth:`prepare`) and kept.

    Args:
        vocab: the vocabulary size.
        device: where the graph runs (the target's device).
        logits_dtype: the type of the logits the target's state returns ("fp32" for host
            logits of any model, the model's dtype for device logits).
        compute: "float32" or "float64", the graph's arithmetic.
    """

    def __init__(self, vocab: int, *, device: Device = Device("cpu"),
                 logits_dtype: str = "fp32", compute: str = "float32", options=None):
        self.vocab, self.device = int(vocab), device
        self.logits_dtype, self.compute, self.options = logits_dtype, compute, options
        self._verifiers: dict[tuple[int, SamplingConfig], DeviceVerifier] = {}

    @classmethod
    def for_model(cls, model, *, compute: str = "float32", options=None) -> GraphVerifier:
        """The verifier for ``model``'s logits (a StaticOrtModel's on its device, an
        OrtModel's float32 host logits)."""
        static = model.manifest.kv_cache == "static"
        return cls(model.vocab_size, device=model.device, compute=compute, options=options,
                   logits_dtype=model.manifest.dtype if static else "fp32")

    def get(self, gamma: int, sampling: SamplingConfig) -> DeviceVerifier:
        key = (int(gamma), sampling)
        if key not in self._verifiers:
            self._verifiers[key] = DeviceVerifier(
                gamma, self.vocab, sampling, device=self.device, logits_dtype=self.logits_dtype,
                compute=self.compute, options=self.options)
        return self._verifiers[key]

    def prepare(self, gamma: int, sampling: SamplingConfig) -> None:
        """Build the graphs for every draft length 1..gamma now (outside timed code)."""
        for g in range(1, int(gamma) + 1):
            self.get(g, sampling)

    def __call__(self, target: DecodeState, scored: Sequence[int], candidates: Candidates,
                 sampling: SamplingConfig, accept_uniforms: np.ndarray, sample_uniform: float,
                 *, lenience: float = 1.0) -> Verdict:
        if lenience != 1.0:
            raise ValueError(
                f"the verification graph applies the exact rule (lenience 1), not {lenience}; "
                "verify on the host for the lossy rule"
            )
        gamma = len(candidates.tokens)
        logits = advance_device(target, scored, gamma + 1)  # [1, k, V] or [k, V], k >= g + 1
        verifier = self.get(gamma, sampling)
        if verifier.greedy:  # q is read at the target's choices only (no rows are built)
            n, token, choices = verifier.run_greedy(logits, candidates.tokens)
            reached = min(n + 1, gamma)
            return Verdict(n, token, candidates.q_at(choices[:reached]).tolist())
        n, token, beta = verifier.run(
            logits, candidates.probs, candidates.tokens, accept_uniforms, sample_uniform)
        reached = min(n + 1, gamma)
        return Verdict(n, token, beta[:reached].astype(float).tolist())
