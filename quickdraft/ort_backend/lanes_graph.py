"""A static decoder graph whose batch rows are separate sequences: :func:`lanes_graph`.

GroupQueryAttention takes several new tokens only at batch size 1 (ONNX Runtime refuses
``sequence_length > 1`` with a past at batch > 1). So the rewrite splits each attention
node's packed query/key/value and ``seqlens_k`` along the batch axis into one node per
lane, each with its own cache buffers (inputs ``past_key_values.{i}.key.lane{b}``,
outputs ``present.{i}.key.lane{b}``, bound to one state's cache as past and present), and
concatenates their outputs again; every other node (the projections, the MLPs, the head)
runs once over all lanes, reading the weights once. docs/explanation/lanes.md says why.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ATTENTION", "LanesGraphError", "lane_name", "lanes_graph"]

ATTENTION = "GroupQueryAttention"
_QKV, _KEY, _VALUE, _PAST_KEY, _PAST_VALUE, _SEQLENS = range(6)
_SIN_CACHE = 8  # inputs past it (position ids, an attention bias, ...) are batch-shaped


class LanesGraphError(ValueError):
    """A graph this rewrite does not cover."""


def lane_name(name: str, lane: int) -> str:
    """The name of lane ``lane``'s copy of a cache input or output."""
    return f"{name}.lane{lane}"


def lanes_graph(model, lanes: int, past_names: Sequence[str], present_names: Sequence[str]):
    """A copy of the static decoder ``model`` (an ``onnx.ModelProto``, external data not
    loaded) that runs ``lanes`` sequences per call, each over its own caches.

    Inputs ``input_ids`` [lanes, k] and ``attention_mask`` [lanes, T] keep their names,
    as do ``logits`` [lanes, k, V] and ``greedy_tokens``; each cache input and output of
    shape [1, kv, T, hd] is there once per lane (:func:`lane_name`)."""
    from onnx import helper, numpy_helper

    if int(lanes) != lanes or lanes < 2:
        raise ValueError(f"lanes must be an integer >= 2, got {lanes!r}")
    past, present = set(past_names), set(present_names)
    graph = model.graph
    attention = [n for n in graph.node if n.op_type == ATTENTION]
    if not attention:
        raise LanesGraphError(f"the graph has no {ATTENTION} node: lanes need a static export")
    for n in graph.node:
        uses = past.intersection(n.input)
        if uses and n.op_type != ATTENTION:
            raise LanesGraphError(f"node {n.name or n.op_type} reads the caches "
                                  f"({sorted(uses)[0]}): only {ATTENTION} may")
    for n in attention:
        if n.input[_PAST_KEY] not in past or n.input[_PAST_VALUE] not in past or \
                not present.issuperset(n.output[1:3]):
            raise LanesGraphError(f"{n.name}: its caches are not graph inputs and outputs")
        if n.domain != "com.microsoft":
            raise LanesGraphError(f"{n.name}: {ATTENTION} outside com.microsoft")
        extra = [x for x in n.input[_SIN_CACHE + 1:] if x]
        if extra:
            raise LanesGraphError(f"{n.name}: {ATTENTION} with input {extra[0]} past the "
                                  "rotary caches, which lanes do not split")

    out = type(model)()
    out.CopyFrom(model)
    g = out.graph
    ones = "lanes/split_sizes"
    g.initializer.append(numpy_helper.from_array(np.ones(lanes, dtype=np.int64), ones))
    split_done: dict[str, list[str]] = {}  # a batch-major tensor -> its lane pieces

    def pieces(name: str, new_nodes: list) -> list[str]:
        if name not in split_done:
            outs = [f"lanes/{name}/{b}" for b in range(lanes)]
            new_nodes.append(helper.make_node("Split", [name, ones], outs, axis=0,
                                              name=f"lanes/split/{name}"))
            split_done[name] = outs
        return split_done[name]

    nodes: list = []
    for n in g.node:
        if n.op_type != ATTENTION:
            nodes.append(n)
            continue
        q = pieces(n.input[_QKV], nodes)
        k = pieces(n.input[_KEY], nodes) if n.input[_KEY] else None
        v = pieces(n.input[_VALUE], nodes) if n.input[_VALUE] else None
        seqlens = pieces(n.input[_SEQLENS], nodes)
        outs = []
        for b in range(lanes):
            inputs = list(n.input)
            inputs[_QKV] = q[b]
            if k is not None:
                inputs[_KEY], inputs[_VALUE] = k[b], v[b]
            inputs[_PAST_KEY] = lane_name(n.input[_PAST_KEY], b)
            inputs[_PAST_VALUE] = lane_name(n.input[_PAST_VALUE], b)
            inputs[_SEQLENS] = seqlens[b]
            outs.append(f"lanes/{n.output[0]}/{b}")
            node = helper.make_node(ATTENTION, inputs,
                                    [outs[-1], lane_name(n.output[1], b),
                                     lane_name(n.output[2], b)],
                                    name=f"{n.name}/lane{b}", domain=n.domain)
            node.attribute.extend(n.attribute)
            nodes.append(node)
        nodes.append(helper.make_node("Concat", outs, [n.output[0]], axis=0,
                                      name=f"{n.name}/lanes"))
    del g.node[:]
    g.node.extend(nodes)

    def per_lane(values, names: set) -> list:
        kept = []
        for vi in values:
            if vi.name not in names:
                kept.append(vi)
                continue
            for b in range(lanes):
                copy = type(vi)()
                copy.CopyFrom(vi)
                copy.name = lane_name(vi.name, b)
                dim = copy.type.tensor_type.shape.dim[0]
                dim.Clear()
                dim.dim_value = 1
                kept.append(copy)
        return kept

    inputs, outputs = per_lane(g.input, past), per_lane(g.output, present)
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(outputs)
    del g.value_info[:]  # shapes of the split tensors changed; ONNX Runtime infers them
    return out
