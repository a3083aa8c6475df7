"""The acceptance rule as an ONNX graph: :func:`build_verify_graph`.

Each step mirrors, under the same name, its NumPy counterpart in
:mod:`quickdraft.verification.rule` (exact rule, temperature > 0) and uses the rule's
constants. Standard operators only; onnx is imported when a graph is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quickdraft.sampling import SamplingConfig
from quickdraft.verification.rule import RESIDUAL_EPS

__all__ = ["build_sample_graph", "build_verify_graph", "append_sample_graph",
           "SAMPLED_TOKEN", "SAMPLED_PROBS", "SAMPLE_UNIFORM", "COMPUTE_TYPES",
           "LOGITS_TYPES", "OPSET"]

OPSET = 17
# compute name -> (NumPy type, ONNX element type)
COMPUTE_TYPES = {"float32": (np.float32, 1), "float64": (np.float64, 11)}
# logits dtype -> (NumPy type, ONNX element type): the models' logits (bf16 has no NumPy
# type) and fp64
LOGITS_TYPES = {"fp32": (np.float32, 1), "fp16": (np.float16, 10), "fp64": (np.float64, 11)}
_INT64_MAX = np.iinfo(np.int64).max
# the names append_sample_graph gives a model's new input and outputs
SAMPLE_UNIFORM, SAMPLED_TOKEN, SAMPLED_PROBS = "sample_uniform", "sampled_token", "sampled_probs"
# entries per block of the two-level prefix sums (_cumsum): ONNX Runtime's CumSum kernels
# add each output's whole prefix on their own, O(V^2) work over a row of V
SCAN_BLOCK = 256


class _Builder:
    """A tiny helper over onnx.helper: unique names, constants, one node per call."""

    def __init__(self, np_type, vocab: int):
        self.vocab = vocab
        self.nodes: list = []
        self.inits: list = []
        self.np_type = np_type  # the compute type of constants
        self.onnx_type = COMPUTE_TYPES[np.dtype(np_type).name][1]
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

    def ints(self, *values: int) -> str:
        """An int64 vector constant (axes, starts, ends, k)."""
        return self.const(list(values), np.int64)

    def fill_like(self, x: str, value: float) -> str:
        """A tensor shaped like ``x`` filled with ``value`` (in the compute type)."""
        from onnx import numpy_helper

        fill = numpy_helper.from_array(np.asarray([value], dtype=self.np_type))
        return self.op("ConstantOfShape", [self.op("Shape", [x])], value=fill)

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, out: str | None = None,
           **attrs):
        """Add one node; ``out`` names its (single) output, e.g. a graph output."""
        from onnx import helper

        outs = [out] if out is not None else [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def rows(self, x: str, start: int, end: int) -> str:
        """x[start:end] along axis 0."""
        return self.op("Slice", [x, self.ints(start), self.ints(end), self.ints(0)])


def _adjust(b: _Builder, z: str, sampling: SamplingConfig) -> str:
    """quickdraft.sampling.adjust_logits for temperature > 0: logits z [R, V] -> p [R, V]."""
    if sampling.temperature != 1.0:  # z /= config.temperature
        z = b.op("Div", [z, b.const(sampling.temperature)])
    vocab = b.vocab
    if 0 < sampling.top_k < vocab:
        # keep exactly k: TopK breaks ties towards the lower index, like the stable argsort
        _, order = b.op("TopK", [z, b.ints(sampling.top_k)], n_out=2, axis=-1, largest=1,
                        sorted=1)  # [R, k]
        keep = b.op("ScatterElements", [b.fill_like(z, 0.0), order, b.fill_like(order, 1.0)],
                    axis=-1)  # [R, V] 1 where rank < k
        z = b.op("Where", [b.op("Greater", [keep, b.const(0.5)]), z, b.const(-np.inf)])
    probs = b.op("Softmax", [z], axis=-1)  # [R, V]   _softmax_(z)
    if sampling.top_p < 1.0:
        sorted_p, order = b.op("TopK", [probs, b.ints(vocab)], n_out=2, axis=-1, largest=1,
                               sorted=1)  # [R, V]
        mass_before = b.op("Sub", [_cumsum(b, sorted_p), sorted_p])  # [R, V]
        # a top_p below the compute type's smallest normal would round to 0 and keep
        # nothing; at that floor the top token alone stays, as with any smaller top_p
        # (its own mass is at least 1 / V)
        top_p = max(sampling.top_p, float(np.finfo(b.np_type).tiny))
        keep_sorted = b.op("Cast", [b.op("Less", [mass_before, b.const(top_p)])],
                           to=b.onnx_type)  # mass_before < top_p
        keep = b.op("ScatterElements", [b.fill_like(probs, 0.0), order, keep_sorted], axis=-1)
        probs = b.op("Where", [b.op("Greater", [keep, b.const(0.5)]), probs, b.const(0.0)])
        total = b.op("ReduceSum", [probs, b.ints(-1)], keepdims=1)  # [R, 1]
        probs = b.op("Div", [probs, total])
    return probs


def _cumsum(b: _Builder, x: str) -> str:
    """Inclusive prefix sums of x [R, V] along V, in two levels: within blocks of
    SCAN_BLOCK entries, then the blocks' totals (O(V * SCAN_BLOCK) work, not O(V^2)).

    Each level adds in index order, and a block's offset is the previous offset plus that
    block's last in-block sum, so the sums of non-negative entries stay non-decreasing and
    a zero entry repeats its predecessor exactly: what the inverse CDF relies on."""
    vocab = b.vocab
    width = min(SCAN_BLOCK, vocab)
    blocks = -(-vocab // width)
    axis = b.const(-1, np.int64)
    if blocks == 1:
        return b.op("CumSum", [x, axis])
    pad = blocks * width - vocab
    padded = b.op("Pad", [x, b.ints(0, 0, 0, pad)]) if pad else x  # [R, blocks * width]
    xb = b.op("Reshape", [padded, b.ints(-1, blocks, width)])  # [R, blocks, width]
    within = b.op("CumSum", [xb, axis])  # [R, blocks, width]
    totals = b.op("Slice", [within, b.ints(-1), b.ints(_INT64_MAX), b.ints(2)])  # [R, blocks, 1]
    offsets = b.op("CumSum", [totals, b.const(1, np.int64)], exclusive=1)  # [R, blocks, 1]
    flat = b.op("Reshape", [b.op("Add", [within, offsets]), b.ints(-1, blocks * width)])
    if not pad:
        return flat  # [R, V]
    return b.op("Slice", [flat, b.ints(0), b.ints(vocab), b.ints(1)])  # [R, V]


def _at(b: _Builder, rows: str, x_col: str) -> str:
    """rows[i, x_i]: rows [gamma, V], x_col [gamma, 1] -> [gamma]."""
    return b.op("Squeeze", [b.op("GatherElements", [rows, x_col], axis=1), b.ints(1)])


def _residual_distribution(b: _Builder, p: str, q: str) -> str:
    """rule.residual_distribution: norm(max(0, p - q)), p where that is empty; [1, V]."""
    r = b.op("Max", [b.op("Sub", [p, q]), b.const(0.0)])  # [1, V]
    total = b.op("ReduceSum", [r, b.ints(-1)], keepdims=1)  # [1, 1]
    empty = b.op("LessOrEqual", [total, b.const(RESIDUAL_EPS)])  # total <= RESIDUAL_EPS
    safe_total = b.op("Where", [empty, b.const(1.0), total])
    return b.op("Where", [empty, p, b.op("Div", [r, safe_total])])


def _inverse_cdf(b: _Builder, weights: str, u: str, out: str) -> str:
    """rule.inverse_cdf: weights [1, V], u [1] -> the index [1] int64 (named ``out``)."""
    from onnx import TensorProto

    f32 = TensorProto.FLOAT
    cdf = _cumsum(b, weights)  # [1, V]
    total = b.op("Slice", [cdf, b.ints(-1), b.ints(_INT64_MAX), b.ints(1)])  # [1, 1]
    threshold = b.op("Mul", [b.op("Unsqueeze", [u, b.ints(0)]), total])  # [1, 1]
    # idx = count_nonzero(cdf <= threshold)
    below = b.op("Cast", [b.op("LessOrEqual", [cdf, threshold])], to=f32)
    idx = b.op("ReduceSum", [below, b.ints(-1)], keepdims=0)  # [1]
    # idx == V falls back to the last token of positive weight: min(idx, last positive)
    vocab_index = b.const(np.arange(b.vocab, dtype=np.float32)[None], np.float32)  # [1, V]
    positive = b.op("Where", [b.op("Greater", [weights, b.const(0.0)]), vocab_index,
                              b.const(-1.0, np.float32)])
    # the largest such index (TopK: the same node in every opset from 11 on)
    last_positive = b.op("Squeeze", [b.op("TopK", [positive, b.ints(1)], n_out=2, axis=-1,
                                          largest=1)[0], b.ints(1)])  # [1]
    return b.op("Cast", [b.op("Min", [idx, last_positive])], out=out, to=TensorProto.INT64)


# the graphs divide the logits by T before their softmax: below this, logits of a few
# thousand overflow float32 (the host rule subtracts the row maximum first and takes any T)
MIN_TEMPERATURE = 1e-30


def _check_settings(vocab: int, sampling: SamplingConfig, logits_dtype: str, compute: str,
                    greedy_refusal: str) -> None:
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    if compute not in COMPUTE_TYPES:
        raise ValueError(f"compute must be float32 or float64, got {compute!r}")
    if logits_dtype not in LOGITS_TYPES:
        raise ValueError(f"logits_dtype must be fp32, fp16 or fp64, got {logits_dtype!r}")
    if sampling.greedy:
        raise ValueError(greedy_refusal)
    if sampling.temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature {sampling.temperature:g} is below the {MIN_TEMPERATURE:g} the "
            "device graphs take (their logits / T would overflow); sample and verify such "
            "temperatures on the host (verify='host', device_sampling=False), or use 0 "
            "for greedy decoding")


def _model(b: _Builder, name: str, inputs: list, outputs: list):
    """The checked ``onnx.ModelProto`` of ``b``'s nodes."""
    import onnx
    from onnx import helper

    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="quickdraft")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_verify_graph(
    gamma: int,
    vocab: int,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    logits_dtype: str = "fp32",
    compute: str = "float32",
    stand_in: bool = False,
):
    """:func:`quickdraft.verification.verify` (lenience 1) after ``adjust_logits`` of the
    target's logits, as an ``onnx.ModelProto``.

    Inputs: ``target_logits`` [1, S, V] in ``logits_dtype`` ("fp32", "fp16" or "fp64"; any
    S >= gamma + 1, the last gamma + 1 rows are used), ``draft_probs`` [gamma, V],
    ``accept_uniforms`` [gamma] and ``sample_uniform`` [1] in ``compute`` ("float32" or
    "float64"), ``draft_tokens`` [gamma] int64. Outputs: ``n`` [1] and ``next_token`` [1]
    int64, ``beta`` [gamma] in ``compute`` (:func:`quickdraft.theory.beta` of p_i, q_i).

    ``stand_in``: the pipelined verdict (:func:`quickdraft.pipelined.verify_without_bonus`)
    on gamma candidates, the last a stand-in for the bonus: the target scored only gamma
    positions (the last gamma rows of ``target_logits`` are used, S >= gamma), and q comes
    in two inputs, ``draft_probs`` [gamma - 1, V] (the proposal's rows; absent when gamma
    is 1) and ``stand_in_probs`` [1, V], which may lie in different buffers. When all gamma
    are kept ``next_token`` is meaningless (no bonus is drawn without p_{gamma + 1}).

    ``sampling`` is what q was adjusted with; temperature 0 is refused: greedy is decided
    by :func:`quickdraft.verification.verify_greedy` on the target's argmax ids.
    """
    from onnx import TensorProto, helper

    if int(gamma) != gamma or gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1, got {gamma}")
    _check_settings(vocab, sampling, logits_dtype, compute,
                    "the verification graph is for sampling (temperature > 0); greedy "
                    "decoding is decided by quickdraft.verification.verify_greedy on the "
                    "target's argmax ids (quickdraft.protocols.advance_greedy)")
    gamma, vocab = int(gamma), int(vocab)
    np_type, onnx_type = COMPUTE_TYPES[compute]
    b = _Builder(np_type, vocab)
    value = helper.make_tensor_value_info
    proposal = gamma - 1 if stand_in else gamma  # q rows in draft_probs
    inputs = [value("target_logits", LOGITS_TYPES[logits_dtype][1], [1, "S", vocab])]
    if proposal:
        inputs.append(value("draft_probs", onnx_type, [proposal, vocab]))
    if stand_in:
        inputs.append(value("stand_in_probs", onnx_type, [1, vocab]))
    inputs += [value("draft_tokens", TensorProto.INT64, [gamma]),
               value("accept_uniforms", onnx_type, [gamma]),
               value("sample_uniform", onnx_type, [1])]

    # host_verify: p = adjust_logits(logits[-(gamma + 1):], sampling)
    scored = gamma if stand_in else gamma + 1  # rows the target scored
    z = b.op("Squeeze", ["target_logits", b.ints(0)])  # [S, V]
    z = b.op("Cast", [b.rows(z, -scored, _INT64_MAX)], to=onnx_type)  # [scored, V]
    p = _adjust(b, z, sampling)  # [scored, V]
    if stand_in:  # verify_without_bonus: p_gamma stands in for the row the bonus would read
        p = b.op("Concat", [p, b.rows(p, -1, _INT64_MAX)], axis=0)  # [gamma + 1, V]
        q = (b.op("Concat", ["draft_probs", "stand_in_probs"], axis=0) if proposal
             else "stand_in_probs")  # [gamma, V]
    else:
        q = "draft_probs"  # [gamma, V]
    _verify_nodes(b, p, q, "draft_tokens", "accept_uniforms", "sample_uniform", gamma)
    outputs = [value("n", TensorProto.INT64, [1]),
               value("next_token", TensorProto.INT64, [1]),
               value("beta", onnx_type, [gamma])]
    return _model(b, "quickdraft_verify", inputs, outputs)


def _verify_nodes(b: _Builder, p: str, q: str, x: str, u: str, s: str, gamma: int) -> None:
    """verify_batch step for step (B = 1) on p [gamma + 1, V], q [gamma, V], the tokens x
    [gamma], accept uniforms u [gamma] and the sample uniform s [1] -> the graph outputs
    ``n``, ``next_token`` and ``beta``."""
    from onnx import TensorProto

    vocab = b.vocab
    x_col = b.op("Unsqueeze", [x, b.ints(1)])  # [gamma, 1]
    p_g = b.rows(p, 0, gamma)  # [gamma, V]
    p_x = _at(b, p_g, x_col)  # [gamma]
    q_x = _at(b, q, x_col)  # [gamma]
    accepted = b.op("Less", [b.op("Mul", [u, q_x]), p_x])  # [gamma]   u * q_x < p_x
    # n = gamma if all accepted else the first rejection: argmax of [rejected..., 1]
    rejected = b.op("Cast", [b.op("Not", [accepted])], to=TensorProto.FLOAT)
    padded = b.op("Concat", [rejected, b.const([1.0], np.float32)], axis=0)  # [gamma + 1]
    n = b.op("ArgMax", [padded], out="n", axis=0, keepdims=1)  # [1]
    # q_n is q at the first rejection, and a zero row at gamma (the bonus comes from p_gamma)
    p_n = b.op("Gather", [p, n], axis=0)  # [1, V]
    q_pad = b.op("Concat", [q, b.const(np.zeros((1, vocab)))], axis=0)  # [gamma + 1, V]
    q_n = b.op("Gather", [q_pad, n], axis=0)  # [1, V]
    weights = _residual_distribution(b, p_n, q_n)  # [1, V]
    _inverse_cdf(b, weights, s, out="next_token")  # [1]
    # theory.beta(p[:gamma], q): the acceptance probability at each position
    b.op("ReduceSum", [b.op("Min", [p_g, q]), b.ints(-1)], out="beta", keepdims=0)  # [gamma]


def build_sample_graph(vocab: int, sampling: SamplingConfig = SamplingConfig(), *,
                       logits_dtype: str = "fp32", compute: str = "float32"):
    """One sampled draft token on the device: ``adjust_logits`` of the last row of the
    logits, then the inverse-CDF draw with a given uniform, as an ``onnx.ModelProto``.

    Inputs: ``logits`` [1, S, V] in ``logits_dtype`` (the last row is used), ``uniform`` [1]
    in ``compute``. Outputs: ``token`` [1] int64 and ``probs`` [1, V] in ``compute``: the q
    row the token was drawn from, for the verification graph to read where it lies.
    """
    from onnx import TensorProto, helper

    _check_settings(vocab, sampling, logits_dtype, compute,
                    "the sampling graph is for temperature > 0; a greedy draft token is the "
                    "argmax the model's graph computes (greedy_tokens)")
    vocab = int(vocab)
    np_type, onnx_type = COMPUTE_TYPES[compute]
    b = _Builder(np_type, vocab)
    value = helper.make_tensor_value_info
    inputs = [value("logits", LOGITS_TYPES[logits_dtype][1], [1, "S", vocab]),
              value("uniform", onnx_type, [1])]
    _sample_nodes(b, "logits", "uniform", sampling, "token", "probs")
    outputs = [value("token", TensorProto.INT64, [1]), value("probs", onnx_type, [1, vocab])]
    return _model(b, "quickdraft_sample", inputs, outputs)


def append_sample_graph(model, vocab: int, sampling: SamplingConfig, *,
                        logits_dtype: str = "fp32", compute: str = "float32"):
    """A copy of a decoder's ``onnx.ModelProto`` that also draws its next token: the
    sampling graph's steps (:func:`build_sample_graph`) on its ``logits`` output, with a
    new input ``sample_uniform`` [1] and outputs ``sampled_token`` [1] int64 and
    ``sampled_probs`` [1, V], so one run of the model makes a draft step and its draw
    (a sampled greedy-chain step). The nodes are valid in every opset from 17 on; the
    model keeps its own."""
    from onnx import TensorProto, helper

    _check_settings(vocab, sampling, logits_dtype, compute,
                    "a greedy draft token is the argmax the model's graph computes "
                    "(greedy_tokens)")
    np_type, onnx_type = COMPUTE_TYPES[compute]
    out = type(model)()
    out.CopyFrom(model)
    b = _Builder(np_type, int(vocab))
    b.name = lambda hint, _next=b.name: "quickdraft_sample/" + _next(hint)  # no clashes
    _sample_nodes(b, "logits", SAMPLE_UNIFORM, sampling, SAMPLED_TOKEN, SAMPLED_PROBS)
    graph = out.graph
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.inits)
    graph.input.append(helper.make_tensor_value_info(SAMPLE_UNIFORM, onnx_type, [1]))
    graph.output.extend([helper.make_tensor_value_info(SAMPLED_TOKEN, TensorProto.INT64, [1]),
                         helper.make_tensor_value_info(SAMPLED_PROBS, onnx_type,
                                                       [1, int(vocab)])])
    return out


def _sample_nodes(b: _Builder, logits: str, uniform: str, sampling: SamplingConfig,
                  token: str, probs: str) -> None:
    """The sampling graph's steps on ``logits`` [1, S, V]: q of the last row -> ``probs``
    [1, V], its inverse-CDF draw with ``uniform`` [1] -> ``token`` [1]."""
    z = b.op("Squeeze", [logits, b.ints(0)])  # [S, V]
    z = b.op("Cast", [b.rows(z, -1, _INT64_MAX)], to=b.onnx_type)  # [1, V]
    q = _adjust(b, z, sampling)  # [1, V]
    b.op("Identity", [q], out=probs)
    _inverse_cdf(b, q, uniform, out=token)  # [1]
