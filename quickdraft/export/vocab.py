"""A draft whose LM head scores only the frequent tokens (frequency-ranked drafting).

A draft's cost on a CPU is mostly its output layer when the vocabulary is large: the
SmolLM2 draft's 256 x 49,152 head is 12.6M multiply-adds against 1.6M for its two decoder
layers. :func:`truncate_head` rewrites an exported draft so that the head computes the
logits of ``keep`` tokens only; every other token gets the logit ``EXCLUDED_LOGIT`` (its
probability is exactly 0 after the softmax at any temperature down to 1e-6), through a
Gather that puts the rows back at their vocabulary ids, so the graph's interface (logits
[B, S, V], the greedy ids) is unchanged. The draft proposes only kept tokens; speculative
sampling stays exact for any q, so the output still follows the target, and only alpha can
fall, by the target mass outside ``keep``. :func:`frequent_tokens` picks ``keep`` by
counting tokens in text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from quickdraft.manifest import load_manifest

__all__ = ["EXCLUDED_LOGIT", "frequent_tokens", "truncate_head"]

EXCLUDED_LOGIT = -1e9  # finite (the backend checks logits are), exp() of it is 0


def frequent_tokens(tokenizer_json: str | os.PathLike, texts: Iterable[str], k: int
                    ) -> np.ndarray:
    """The ``k`` most frequent token ids of ``texts`` under the tokenizer, plus every
    special (added) token; sorted ids [<= k + added] int64."""
    from tokenizers import Tokenizer

    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    tok = Tokenizer.from_file(str(tokenizer_json))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    counts = np.zeros(vocab, dtype=np.int64)
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        counts += np.bincount(np.asarray(enc.ids, dtype=np.int64), minlength=vocab)[:vocab]
    if not counts.any():
        raise ValueError("the texts hold no tokens: give some text to count tokens in")
    order = np.argsort(-counts, kind="stable")  # most frequent first, ties by id
    keep = set(order[:min(k, vocab)].tolist())
    keep |= {int(i) for i in tok.get_added_tokens_decoder()}
    return np.array(sorted(keep), dtype=np.int64)


def _head(graph, vocab: int):
    """(MatMul node, weight) of the LM head: the MatMul producing the graph's ``logits``
    from a constant [hidden, vocab] weight, an initializer or (int8 storage) the
    per-column DequantizeLinear of one; (None, None) when there is none."""
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    for node in graph.node:
        if node.op_type != "MatMul" or node.output[0] != "logits":
            continue
        name = node.input[1]
        w = inits.get(name)
        if w is not None and len(w.dims) == 2 and w.dims[1] == vocab:
            return node, w
        dq = producers.get(name)
        if (dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) >= 2
                and all(i in inits for i in dq.input[:2])
                and {a.name: a.i for a in dq.attribute}.get("axis") == 1
                and list(inits[dq.input[0]].dims)[1:] == [vocab]):
            return node, dq
    return None, None


def _kept_weight(graph, weight, ids, names):
    """Initializers (and for int8 storage the DequantizeLinear node) of the head's kept
    columns plus one column of zeros [hidden, k + 1], as ``names["weight"]``."""
    from onnx import NodeProto, helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    if not isinstance(weight, NodeProto):
        w = numpy_helper.to_array(weight)  # [hidden, V]
        kept = np.concatenate([w[:, ids], np.zeros((w.shape[0], 1), w.dtype)], axis=1)
        return [numpy_helper.from_array(kept, names["weight"])], [], w.shape[0]
    q = numpy_helper.to_array(inits[weight.input[0]])  # [hidden, V] int8
    scale = numpy_helper.to_array(inits[weight.input[1]])  # [V]
    q_kept = np.concatenate([q[:, ids], np.zeros((q.shape[0], 1), q.dtype)], axis=1)
    s_kept = np.concatenate([scale[ids], np.ones(1, scale.dtype)])  # [k + 1]
    qn, sn = names["weight"] + ".int8", names["weight"] + ".scale"
    node = helper.make_node("DequantizeLinear", [qn, sn], [names["weight"]],
                            name=names["weight"] + ".dequantize", axis=1)
    return ([numpy_helper.from_array(q_kept, qn), numpy_helper.from_array(s_kept, sn)],
            [node], q.shape[0])


def truncate_head(folder: str | os.PathLike, keep: Iterable[int]) -> dict:
    """Rewrite the exported model in ``folder`` (fp32 arithmetic, fp32 or int8-stored
    weights, its LM head a MatMul producing ``logits``) to score only the token ids
    ``keep``; the manifest records how many (``head_tokens``). Returns what changed.
    Nothing is written when ValueError is raised."""
    import onnx
    from onnx import helper, numpy_helper

    folder = Path(folder)
    manifest = load_manifest(folder)
    vocab = manifest.vocab_size
    ids = np.unique(np.asarray(list(keep), dtype=np.int64))
    if ids.size == 0 or ids[0] < 0 or ids[-1] >= vocab:
        raise ValueError(f"keep must hold token ids in [0, {vocab}); got {ids.size} ids "
                         f"from {ids.min() if ids.size else None} to "
                         f"{ids.max() if ids.size else None}")
    if manifest.head_tokens:
        raise ValueError(f"{folder}: the head already scores {manifest.head_tokens} tokens "
                         "only; truncate the original export")
    if manifest.dtype != "fp32" or manifest.weights not in ("", "int8"):
        raise ValueError(f"{folder}: head truncation needs an fp32 export with fp32 or int8 "
                         f"weights (this one is {manifest.dtype}, weights "
                         f"{manifest.weights})")
    path = folder / manifest.model_file
    model = onnx.load(str(path))  # with its external data
    graph = model.graph
    node, weight = _head(graph, vocab)
    if node is None:
        raise ValueError(f"{folder}: no LM head MatMul [hidden, {vocab}] producing 'logits' "
                         "was found; head truncation supports such graphs only")
    k = len(ids)
    names = {n: f"qd_head_{n}" for n in ("weight", "bias", "index", "kept", "scored")}
    kept, dequantize, hidden = _kept_weight(graph, weight, ids, names)
    bias = np.zeros(k + 1, dtype=np.float32)  # [k + 1]: the last column is every other token
    bias[k] = EXCLUDED_LOGIT
    where = np.full(vocab, k, dtype=np.int64)  # [V]: each id's column in the kept logits
    where[ids] = np.arange(k)
    graph.initializer.extend([*kept, numpy_helper.from_array(bias, names["bias"]),
                              numpy_helper.from_array(where, names["index"])])
    for n in dequantize:
        graph.node.insert(list(graph.node).index(node), n)
    node.input[1] = names["weight"]
    node.output[0] = names["kept"]  # [B, S, k + 1]
    at = list(graph.node).index(node) + 1
    graph.node.insert(at, helper.make_node("Add", [names["kept"], names["bias"]],
                                           [names["scored"]], name="qd_head_Add"))
    graph.node.insert(at + 1, helper.make_node("Gather", [names["scored"], names["index"]],
                                               ["logits"], name="qd_head_Gather", axis=-1))
    if not isinstance(weight, onnx.NodeProto) and not any(
            weight.name in n.input for n in graph.node):
        graph.initializer.remove(weight)  # untied: the full head is not needed any more
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))  # one file: the draft is far below protobuf's 2 GB
    os.replace(tmp, path)
    for name in manifest.external_data:
        (folder / name).unlink(missing_ok=True)
    manifest.external_data = []
    manifest.head_tokens = k
    manifest.save(folder)
    return {"head_tokens": k, "vocab_size": vocab, "hidden": int(hidden)}
