"""Validation after export: the ONNX graph, run with ONNX Runtime, against the PyTorch model.

On a few prompts: the logits of one full pass (max abs diff, against a tolerance suited to
the dtype), the same prompt fed as two chunks (the second on top of the first's past), then
greedy decoding for ``steps`` tokens where ONNX Runtime feeds its own
present KV back as past (so the cache path is checked too), and the tokens must equal the
PyTorch model's. For fp16/bf16 every logit and cache value must be finite.

Quantized weights (manifest ``weights`` "int4") cannot reproduce the float model to a
float tolerance: :func:`validate_quantized` bounds the quantization error (max |logit
diff| / max |logit|, greedy agreement with the tokens fed from PyTorch) and checks the
cache exactly, against the graph's own full pass, where quantization plays no part.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from quickdraft.manifest import ModelManifest

__all__ = [
    "ExportValidationError",
    "TOLERANCES",
    "PROMPTS",
    "VALIDATED_DTYPES",
    "QUANTIZED_TOLERANCES",
    "OrtDecoder",
    "validate_export",
    "validate_quantized",
]

# (atol, rtol): fail when max |onnx - torch| > atol + rtol * max |torch logits|
TOLERANCES = {"fp32": (1e-3, 1e-4), "fp16": (2e-2, 1e-2), "bf16": (1e-1, 4e-2)}

PROMPTS = [
    "def main():\n    return",
    "The quick brown fox jumps over the lazy dog.",
    "import numpy as np\n\nclass Model:",
]

# weights -> (max_rel_diff, min_greedy_agreement, cache_max_rel_diff) of a quantized graph:
# fail when max |onnx - torch| > max_rel_diff * max |torch logits| on a prompt, when fewer
# than min_greedy_agreement of the greedy steps (PyTorch's tokens fed to both) have the
# same argmax, or when the cached/chunked logits differ from the graph's own full pass by
# more than cache_max_rel_diff * its max |logit|. Measured with 4-bit blocks of 32 at
# accuracy level 4 on the CPU (onnxruntime 1.32, onnxruntime-genai 0.18):
#   sound graphs: relative diff 0.15 (a trained 26M Llama, greedy agreement 85%), 0.20 and
#   0.36 (the tests' random 1- and 2-layer Llamas, 89% and 58%: near-tied logits, max
#   |logit| 2-3 over 512 tokens); cache vs own full pass 0.011 at most (int8 activations:
#   a 1e-7 change can flip a rounding, ~1% of the largest logit)
#   broken graphs (layers 0 and 1 swapped, the past cache zeroed): relative diff 0.98-1.5,
#   agreement 0-47%; zeroed cache vs own full pass 0.89-1.5
# 0.5 lies 1.4x above the worst sound graph and 2x below the least broken one; the greedy
# floor is a second check (random test models flip near-ties often); 0.05 is 4.5x the
# rounding flips and 18x below a zeroed cache
QUANTIZED_TOLERANCES = {"int4": (0.5, 0.5, 0.05)}

_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
VALIDATED_DTYPES = tuple(_NP_DTYPES)


class ExportValidationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class OrtDecoder:
    """A plain (host-memory) runner of an exported decoder, for validation only."""

    def __init__(self, folder: str | Path, manifest: ModelManifest, device: str = "cpu"):
        from quickdraft.ort_backend.device import (
            CudaUnavailableError,
            create_session,
            resolve_device,
            session_options,
        )

        if manifest.dtype not in _NP_DTYPES:
            raise ExportValidationError(
                f"validation of {manifest.dtype} graphs is not supported (NumPy has no "
                f"{manifest.dtype}); validate fp32 or fp16 exports"
            )
        self.m = manifest
        self.np_dtype = _NP_DTYPES[manifest.dtype]
        path = Path(folder) / manifest.model_file
        try:
            where, _ = resolve_device(device)
            self.session = create_session(path, where, session_options(),
                                          name="the exported graph")
        except CudaUnavailableError as e:
            raise ExportValidationError(
                f"validation on cuda needs onnxruntime-gpu and a CUDA device: {e}"
            ) from e
        except RuntimeError as e:
            raise ExportValidationError(f"ONNX Runtime cannot load the exported graph: {e}") from e

    def empty_past(self) -> list[np.ndarray]:
        shape = (1, self.m.num_kv_heads, 0, self.m.head_dim)
        return [np.zeros(shape, self.np_dtype) for _ in range(2 * self.m.num_layers)]

    def forward(self, ids: list[int], past: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """Logits [len(ids), V] and the present KV (key, value per layer) after ``ids``."""
        m = self.m
        past_len = past[0].shape[2]
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64)}
        if m.has_attention_mask:
            feed["attention_mask"] = np.ones((1, past_len + n), np.int64)
        if m.has_position_ids:
            feed["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
        for i in range(m.num_layers):
            feed[m.past_key_template.format(i=i)] = past[2 * i]
            feed[m.past_value_template.format(i=i)] = past[2 * i + 1]
        names = ["logits"]
        for i in range(m.num_layers):
            names += [m.present_key_template.format(i=i), m.present_value_template.format(i=i)]
        out = self.session.run(names, feed)
        return out[0][0], out[1:]


def _torch_model(src: str | Path, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype)
    return model.to(device).eval()


def _torch_greedy(model, ids: list[int], steps: int, device: str):
    """Full-pass logits over ``ids`` and greedy tokens with their step logits (float64)."""
    import torch

    with torch.no_grad():
        x = torch.tensor([ids], device=device)
        full = model(x, use_cache=False).logits[0].double().cpu().numpy()
        out = model(x, use_cache=True)
        tokens, step_logits = [], []
        for _ in range(steps):
            row = out.logits[0, -1].double().cpu().numpy()
            tok = int(row.argmax())
            tokens.append(tok)
            step_logits.append(row)
            out = model(
                torch.tensor([[tok]], device=device),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return full, tokens, step_logits


def _finite(arrays) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def validate_export(
    folder: str | Path,
    manifest: ModelManifest,
    src: str | Path,
    *,
    device: str = "cpu",
    steps: int = 24,
    prompts: list[str] | None = None,
) -> dict:
    """Check the graph in ``folder`` against the PyTorch model at ``src``; return the numbers.

    Raises ExportValidationError when the logits differ by more than the dtype's
    tolerance, greedy tokens differ (other than at a near-tie), or an fp16/bf16 graph
    produces NaN or infinity.
    """
    from transformers import AutoTokenizer

    if manifest.weights:
        return validate_quantized(folder, manifest, src, device=device, steps=steps,
                                  prompts=prompts)
    start = time.perf_counter()
    prompts = PROMPTS if prompts is None else prompts
    dtype = manifest.dtype
    atol, rtol = TOLERANCES[dtype]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    decoder = OrtDecoder(folder, manifest, device)
    model = _torch_model(src, dtype, device)

    max_diff = max_diff_cached = max_logit = 0.0
    worst_ratio = 0.0
    equal_steps, ties, finite = [], [], True
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [
            manifest.bos_token_id or 0
        ]
        if manifest.max_length > 0:  # leave room for the greedy steps
            ids = ids[: max(1, manifest.max_length - steps - 1)]
        ref_full, ref_tokens, ref_steps = _torch_greedy(model, ids, steps, device)
        scale = float(np.abs(ref_full).max())
        max_logit = max(max_logit, scale)
        tol = atol + rtol * scale

        logits, past = decoder.forward(ids, decoder.empty_past())
        finite &= _finite([logits, *past])
        diff = float(np.abs(logits.astype(np.float64) - ref_full).max())
        max_diff = max(max_diff, diff)
        worst_ratio = max(worst_ratio, diff / tol)
        if not finite:
            break
        if len(ids) >= 2:
            # several tokens on top of a past (as when the target scores a draft): two chunks
            h = len(ids) // 2
            first, part = decoder.forward(ids[:h], decoder.empty_past())
            second, part = decoder.forward(ids[h:], part)
            chunked = np.concatenate([first, second]).astype(np.float64)
            finite &= _finite([chunked, *part])
            diff = float(np.abs(chunked - ref_full).max())
            max_diff_cached = max(max_diff_cached, diff)
            worst_ratio = max(worst_ratio, diff / tol)

        # greedy with the ORT cache: feed each token alone with the previous present as past
        row = logits[-1]
        n_equal = 0
        for k in range(steps):
            tok = int(row.argmax())
            ref_row = ref_steps[k]
            diff = float(np.abs(row.astype(np.float64) - ref_row).max())
            max_diff_cached = max(max_diff_cached, diff)
            worst_ratio = max(worst_ratio, diff / tol)
            if tok != ref_tokens[k]:
                margin = float(ref_row[ref_tokens[k]] - ref_row[tok])
                if margin > tol:
                    raise ExportValidationError(
                        f"greedy tokens differ at step {k} of prompt {prompt!r}: ONNX chose "
                        f"{tok}, PyTorch {ref_tokens[k]} (PyTorch logit margin {margin:.3g} "
                        f"> tolerance {tol:.3g})"
                    )
                ties.append({"prompt": prompt, "step": k, "margin": margin})
                break  # a near-tie: the sequences legitimately part here
            n_equal += 1
            if k + 1 < steps:
                row, past = decoder.forward([tok], past)
                row = row[-1]
                finite &= _finite([row, *past])
                if not finite:
                    break
        equal_steps.append(n_equal)
        if not finite:
            break

    result = {
        "device": device,
        "dtype": dtype,
        "prompts": len(prompts),
        "max_abs_diff": max_diff,
        "max_abs_diff_cached": max_diff_cached,
        "max_abs_logit": max_logit,
        "tolerance": {"atol": atol, "rtol": rtol},
        "diff_over_tolerance": worst_ratio,
        "greedy_steps": steps,
        "greedy_equal_steps": equal_steps,
        "greedy_near_ties": ties,
        "finite": finite,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if not finite:
        raise ExportValidationError(
            f"the {dtype} graph produced NaN or infinity on the validation prompts "
            "(overflow); export in fp32 or bf16"
        )
    if worst_ratio > 1.0:
        raise ExportValidationError(
            f"ONNX logits differ from PyTorch by {max(max_diff, max_diff_cached):.3g}, above the "
            f"{dtype} tolerance (atol {atol}, rtol {rtol} of max |logit| {max_logit:.3g})"
        )
    return result


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def validate_quantized(
    folder: str | Path,
    manifest: ModelManifest,
    src: str | Path,
    *,
    device: str = "cpu",
    steps: int = 24,
    prompts: list[str] | None = None,
) -> dict:
    """:func:`validate_export` for a graph with quantized weights (``manifest.weights``).

    Against the float PyTorch model (in ``manifest.dtype``, the graph's cache and logits
    dtype), on each prompt: the full pass and ``steps`` greedy steps, where both are fed
    PyTorch's greedy tokens (ONNX Runtime through its own cache), so every step compares
    the same prefix: max |logit diff| / max |logit| must stay within the weights'
    ``max_rel_diff`` and the argmax must agree on ``min_greedy_agreement`` of all steps
    (:data:`QUANTIZED_TOLERANCES`). The cache itself is checked to the float tolerance of
    the dtype: the prompt in two chunks, and the logits of every cached step, against the
    graph's own full pass over the same tokens (no quantization difference there).
    ``greedy_equal_steps`` counts, per prompt, the steps before the first disagreement.
    """
    from transformers import AutoTokenizer

    start = time.perf_counter()
    prompts = PROMPTS if prompts is None else prompts
    dtype, weights = manifest.dtype, manifest.weights
    if weights not in QUANTIZED_TOLERANCES:
        raise ExportValidationError(f"validation of {weights} weights is not supported")
    max_rel, min_agree, cache_rel = QUANTIZED_TOLERANCES[weights]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    decoder = OrtDecoder(folder, manifest, device)
    model = _torch_model(src, dtype, device)

    max_diff = max_diff_cached = max_logit = worst_rel = 0.0
    cache_diff = cache_ratio = cache_rel_diff = 0.0
    equal_steps, agree_steps, disagreements, finite = [], [], [], True
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [
            manifest.bos_token_id or 0
        ]
        if manifest.max_length > 0:  # leave room for the greedy steps
            ids = ids[: max(1, manifest.max_length - steps - 1)]
        ref_full, ref_tokens, ref_steps = _torch_greedy(model, ids, steps, device)
        scale = max(float(np.abs(ref_full).max()), *(float(np.abs(r).max()) for r in ref_steps))
        max_logit = max(max_logit, scale)

        logits, past = decoder.forward(ids, decoder.empty_past())
        finite &= _finite([logits, *past])
        if not finite:
            break
        diff = _max_diff(logits, ref_full)
        max_diff = max(max_diff, diff)
        worst_rel = max(worst_rel, diff / scale)
        # the steps, fed PyTorch's tokens through the graph's own cache
        rows, row = [], logits[-1]
        n_agree = n_equal = 0
        for k in range(steps):
            rows.append(row)
            tok, ref_row = int(row.argmax()), ref_steps[k]
            diff = _max_diff(row, ref_row)
            max_diff_cached = max(max_diff_cached, diff)
            worst_rel = max(worst_rel, diff / scale)
            if tok == ref_tokens[k]:
                n_agree += 1
                n_equal += n_equal == k
            else:
                disagreements.append({"prompt": prompt, "step": k, "margin": float(
                    ref_row[ref_tokens[k]] - ref_row[tok])})
            if k + 1 < steps:
                out, past = decoder.forward([ref_tokens[k]], past)
                row = out[-1]
                finite &= _finite([row, *past])
                if not finite:
                    break
        if not finite:
            break
        equal_steps.append(n_equal)
        agree_steps.append(n_agree)
        # the cache against the graph's own full pass over the same tokens
        seq = ids + ref_tokens[: steps - 1]
        own, _ = decoder.forward(seq, decoder.empty_past())
        own_tol = cache_rel * float(np.abs(own).max())
        diffs = [_max_diff(np.stack(rows), own[len(ids) - 1:])]
        if len(ids) >= 2:
            h = len(ids) // 2
            first, part = decoder.forward(ids[:h], decoder.empty_past())
            second, _ = decoder.forward(ids[h:], part)
            diffs.append(_max_diff(np.concatenate([first, second]), own[: len(ids)]))
        cache_diff = max(cache_diff, *diffs)
        cache_ratio = max(cache_ratio, max(diffs) / own_tol)
        cache_rel_diff = max(cache_rel_diff, max(diffs) / float(np.abs(own).max()))

    total = sum(agree_steps)
    agreement = total / (steps * len(agree_steps)) if agree_steps else 0.0
    result = {
        "device": device,
        "dtype": dtype,
        "weights": weights,
        "prompts": len(prompts),
        "max_abs_diff": max_diff,
        "max_abs_diff_cached": max_diff_cached,
        "max_abs_logit": max_logit,
        "max_rel_diff": worst_rel,
        "cache_max_abs_diff": cache_diff,
        "cache_max_rel_diff": cache_rel_diff,
        "tolerance": {"max_rel_diff": max_rel, "min_greedy_agreement": min_agree,
                      "cache_max_rel_diff": cache_rel},
        "diff_over_tolerance": max(worst_rel / max_rel, cache_ratio),
        "greedy_steps": steps,
        "greedy_equal_steps": equal_steps,
        "greedy_agree_steps": agree_steps,
        "greedy_agreement": agreement,
        "greedy_disagreements": disagreements,
        "finite": finite,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if not finite:
        raise ExportValidationError(
            f"the {weights} graph ({dtype} logits) produced NaN or infinity on the validation "
            "prompts"
        )
    if cache_ratio > 1.0:
        raise ExportValidationError(
            f"the {weights} graph's cached or chunked logits differ from its own full pass by "
            f"{cache_diff:.3g} ({cache_rel_diff:.3f} of max |logit|, above {cache_rel}): its KV "
            "cache is broken"
        )
    if worst_rel > max_rel:
        raise ExportValidationError(
            f"the {weights} graph's logits differ from PyTorch by {worst_rel:.3f} of max "
            f"|logit|, above the {max_rel} that {weights} quantization error stays within"
        )
    if agreement < min_agree:
        raise ExportValidationError(
            f"the {weights} graph's greedy tokens agree with PyTorch on {agreement:.0%} of the "
            f"steps ({total}/{steps * len(agree_steps)}), below {min_agree:.0%}"
        )
    return result
