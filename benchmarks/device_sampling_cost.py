"""What the sampling and verification graphs cost per call, one-level against blocked scans.

    python benchmarks/device_sampling_cost.py [--device cuda] [--vocab 32000 49152] \\
        [--json OUT.json]

Both graphs draw by inverse CDF over prefix sums of a [1, V] row, and top-p takes prefix
sums of the sorted rows. ONNX Runtime's CumSum kernel adds each output's whole prefix on
its own: O(V^2) work for a row of V. quickdraft's graphs sum in blocks of
``quickdraft.verification.graph.SCAN_BLOCK`` entries and then over the blocks' totals;
``--blocks`` also times the one-level scan (a block as wide as the row) on the same
inputs, and the tokens of both must be equal. Inputs lie on the device (IOBinding), as in
decoding; medians of ``--repeats`` calls after warm-up. On CUDA each setting also times a
whole verdict as the sampled loop makes it (uploads, the run, the reads back), as
``DeviceVerifier`` runs it and captured as a CUDA graph, and compares their verdicts; and
the same for one autoregressive draw (``DeviceSampler``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import dump_results  # noqa: E402
from quickdraft.verification.graph import SCAN_BLOCK as DEFAULT_BLOCK  # noqa: E402

SETTINGS = {"T=1": (1.0, 1.0), "T=0.7 top-p 0.9": (0.7, 0.9)}
GAMMA = 4



def _time(session, binding, repeats: int) -> float:
    for _ in range(3):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def measure(device, vocab: int, temperature: float, top_p: float, block: int,
            repeats: int, rng) -> dict:
    """ms per sampling call and per verification call (gamma 4), and their tokens."""
    import onnxruntime as ort

    from quickdraft.ort_backend.device import create_session, helper_options
    from quickdraft.sampling import SamplingConfig, adjust_logits
    from quickdraft.verification import graph

    graph.SCAN_BLOCK = block
    sampling = SamplingConfig(temperature, top_p=top_p)
    kind, dev = device.kind, device.device_id
    on = lambda a: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), kind, dev)  # noqa: E731
    z = (rng.normal(size=(1, GAMMA + 1, vocab)) * 3).astype(np.float16)  # [1, gamma + 1, V]
    u = rng.random(GAMMA + 1).astype(np.float32)

    sample = create_session(graph.build_sample_graph(vocab, sampling, logits_dtype="fp16")
                            .SerializeToString(), device, helper_options())
    b = sample.io_binding()
    b.bind_ortvalue_input("logits", on(z[:, -1:]))
    b.bind_ortvalue_input("uniform", on(u[:1]))
    b.bind_output("token", "cpu")
    b.bind_output("probs", kind, dev)
    sample_ms = _time(sample, b, repeats)
    token = int(b.copy_outputs_to_cpu()[0][0])

    verify = create_session(graph.build_verify_graph(GAMMA, vocab, sampling,
                                                     logits_dtype="fp16").SerializeToString(),
                            device, helper_options())
    q = adjust_logits(z[0, :GAMMA].astype(np.float32) + 0.5, sampling).astype(np.float32)
    x = np.array([int(np.argmax(r)) for r in q], dtype=np.int64)  # [gamma] drafted tokens
    v = verify.io_binding()
    for name, value in (("target_logits", z), ("draft_probs", q), ("draft_tokens", x),
                        ("accept_uniforms", u[:GAMMA]), ("sample_uniform", u[-1:])):
        v.bind_ortvalue_input(name, on(value))
    for name in ("n", "next_token", "beta"):
        v.bind_output(name, "cpu")
    verify_ms = _time(verify, v, repeats)
    n, nxt, _ = (o.tolist() for o in v.copy_outputs_to_cpu())
    out = {"vocab": vocab, "block": block, "temperature": temperature, "top_p": top_p,
           "sample_ms": sample_ms, "verify_ms": verify_ms,
           "tokens": [token, int(n[0]), int(nxt[0])]}
    if kind == "cuda" and block == DEFAULT_BLOCK:  # the helpers' sessions are shared
        out.update(_verify_iteration(device, vocab, sampling, z, q, x, u, repeats))
        out.update(_sample_iteration(device, vocab, sampling, z, repeats))
    return out


def _sample_iteration(device, vocab: int, sampling, z, repeats: int) -> dict:
    """One draw as autoregressive sampling makes it (the uniform uploaded, the sampling
    graph run on the last logits row where the model left it, the token read back), ms per
    call, by a ``DeviceSampler`` without and with ``cuda_graph``, tokens compared over
    ``repeats`` fresh uniforms; or why the capture was refused."""
    import onnxruntime as ort

    from quickdraft.ort_backend.verify_graph import DeviceSampler

    logits = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(z[:, -1:]), device.kind,
                                              device.device_id)  # [1, 1, V]
    draws = np.random.default_rng(2).random(repeats + 3)

    def timed(sampler):
        tokens, times = [], []
        for i, u in enumerate(draws):
            t0 = time.perf_counter()
            token = sampler.sample(logits, float(u), 0)
            if i >= 3:  # warm-up (and, with a CUDA graph, its capture)
                times.append(time.perf_counter() - t0)
                tokens.append(token)
        return tokens, 1e3 * float(np.median(times))

    def sampler(cuda_graph: bool):
        return DeviceSampler(vocab, sampling, 1, device=device, logits_dtype="fp16",
                             cuda_graph=cuda_graph)

    plain_tokens, plain_ms = timed(sampler(False))
    out = {"sample_iteration_ms": plain_ms}
    try:
        tokens, graph_ms = timed(sampler(True))
    except Exception as e:  # noqa: BLE001 - recorded: what stops the capture
        out["sample_graph_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        return out
    out["sample_graph_iteration_ms"] = graph_ms
    out["sample_graph_equal"] = tokens == plain_tokens
    return out


def _verify_iteration(device, vocab: int, sampling, z, q, x, u, repeats: int) -> dict:
    """One sampled iteration's verdict as the loop makes it (the drafted tokens, q and the
    uniforms uploaded, the graph run, n / next token / beta read back), ms per call, by a
    ``DeviceVerifier`` without and with ``cuda_graph`` (the target's logits bound on the
    device, where a static model leaves them), the verdicts of both compared over
    ``repeats`` calls of fresh uniforms; or why ONNX Runtime refused the capture."""
    import onnxruntime as ort

    from quickdraft.ort_backend.verify_graph import DeviceVerifier

    target = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(z), device.kind,
                                              device.device_id)
    draws = np.random.default_rng(1).random((repeats + 3, GAMMA + 1))  # fresh per call

    def timed(verifier):
        verdicts, times = [], []
        for i, row in enumerate(draws):
            t0 = time.perf_counter()
            n, token, _ = verifier.run(target, q, x, row[:GAMMA], float(row[GAMMA]))
            if i >= 3:  # warm-up (and, with a CUDA graph, its capture)
                times.append(time.perf_counter() - t0)
                verdicts.append((n, token))
        return verdicts, 1e3 * float(np.median(times))

    def verifier(cuda_graph: bool):
        return DeviceVerifier(GAMMA, vocab, sampling, device=device, logits_dtype="fp16",
                              cuda_graph=cuda_graph)

    plain_verdicts, plain_ms = timed(verifier(False))
    out = {"verify_iteration_ms": plain_ms}
    try:
        captured = verifier(True)
        verdicts, graph_ms = timed(captured)
    except Exception as e:  # noqa: BLE001 - recorded: what stops the capture
        out["verify_graph_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        return out
    out["verify_graph_iteration_ms"] = graph_ms
    out["verify_graph_equal"] = verdicts == plain_verdicts
    out["verify_graphs"] = captured.graphs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--vocab", type=int, nargs="*", default=[32000, 49152])
    ap.add_argument("--blocks", default="256,row",
                    help="scan block widths, 'row' for one level (default 256,row)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from tabulate import tabulate

    from quickdraft.ort_backend.device import Device

    device = Device(args.device, 0)
    rows = []
    for vocab in args.vocab:
        for name, (temperature, top_p) in SETTINGS.items():
            for block in args.blocks.split(","):
                width = vocab if block == "row" else int(block)
                r = measure(device, vocab, temperature, top_p, width, args.repeats,
                            np.random.default_rng(vocab))
                rows.append({"setting": name, **r, "scan": "one level" if width >= vocab
                             else f"blocks of {width}"})
                print(rows[-1], flush=True)
    for vocab in args.vocab:  # the same tokens, however the prefix sums are blocked
        for name in SETTINGS:
            tokens = {str(r["tokens"]) for r in rows if r["vocab"] == vocab
                      and r["setting"] == name}
            if len(tokens) != 1:
                print(f"note: vocab {vocab} {name}: tokens differ across scans: {tokens}")
    keys = ("vocab", "setting", "scan", "sample_ms", "sample_iteration_ms",
            "sample_graph_iteration_ms", "sample_graph_equal", "verify_ms",
            "verify_iteration_ms", "verify_graph_iteration_ms", "verify_graph_equal")
    print(tabulate([{k: r.get(k) for k in keys} for r in rows], headers="keys",
                   tablefmt="github", floatfmt=".3f"))
    for r in rows:
        for what in ("sample", "verify"):
            if f"{what}_graph_error" in r:
                print(f"vocab {r['vocab']} {r['setting']}: no CUDA graph of the {what} graph: "
                      f"{r[what + '_graph_error']}")
    if args.json:
        dump_results(args.json, rows=rows)


if __name__ == "__main__":
    main()
