"""Validation after export: the ONNX graph, run with ONNX Runtime, against the PyTorch model.

On a few prompts: the logits of one full pass (max abs diff, against a tolerance suited to
the dtype), the same prompt fed as two chunks (the second on top of the first's past), then
greedy decoding for ``steps`` tokens where ONNX Runtime feeds its own
present KV back as past (so the cache path is checked too), and the tokens must equal the
PyTorch model's. For fp16/bf16 every logit and cache value must be finite.
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
    "OrtDecoder",
    "validate_export",
]

# (atol, rtol): fail when max |onnx - torch| > atol + rtol * max |torch logits|
TOLERANCES = {"fp32": (1e-3, 1e-4), "fp16": (2e-2, 1e-2), "bf16": (1e-1, 4e-2)}

PROMPTS = [
    "def main():\n    return",
    "The quick brown fox jumps over the lazy dog.",
    "import numpy as np\n\nclass Model:",
]

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
