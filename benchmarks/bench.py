#!/usr/bin/env python
"""quickdraft's benchmark: pairs, stages and systems, side by side in one run.

    # on a GPU machine (see benchmarks/README.md for what to install and the runs)
    python3 benchmarks/bench.py --pairs 1b --out results/
    # on a CPU, tiny everything, to check the pipeline end to end
    python benchmarks/bench.py --smoke

Pairs: ``trained`` (the 97M / 6M pair trained on this machine's Python sources),
``1b`` and ``7b`` (random-weight Llama targets with a ~1-2% draft), ``tiny`` (smoke).
Stages, each skipped when its output is already in the work folder: ``bandwidth``,
``train`` / ``make`` (the pair), ``export`` (quickdraft's
ONNX folders), ``build`` (onnxruntime-genai's, when the fast path's export does not
provide them) and ``systems``. Systems: ``qd-fast``, ``qd-generic``, ``genai``,
``genai-graph``, ``genai-spec``, ``genai-spec-graph``, ``hf``.

Every task runs in a worker process (``benchmarks/worker.py``) with a time limit taken
from ``--budget``; a failure is recorded in the results and the run goes on. Results are
cumulative in ``WORK/results.json`` and copied to ``OUT/results.json`` after every task,
with ``OUT/bench.log`` (everything printed) and ``OUT/table.md`` (the table printed last).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    AUTO_RATE,
    REPO,
    SCHEMA,
    dump_json,
    environment,
    error_record,
    load_json,
    log,
    run_worker,
)
from quickdraft.ort_backend.device import ATTENTION_KERNELS  # noqa: E402

PAIRS = ("trained", "1b", "7b", "tiny")
SYSTEMS = ("qd-fast", "qd-generic", "genai", "genai-graph", "genai-spec", "hf",
           "genai-spec-graph")
STAGES = ("bandwidth", "train", "make", "export", "build", "systems")
# a task does not start with less than this many seconds of budget left
MIN_SECONDS = {"bandwidth": 10, "train": 60, "make": 20, "export": 45, "genai-build": 30,
               "qd": 30, "genai": 20, "hf": 30, "distill": 60}


class Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def parse_ints(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip()
        if ".." in part:
            a, b = part.split("..")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def parse_floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def parse_samplings(s: str) -> list[list[float]]:
    """"1.0:1.0,0.7:0.9" -> [[1.0, 1.0], [0.7, 0.9]] (temperature, top_p); "none" -> []."""
    if s.strip().lower() == "none":
        return []
    out = []
    for part in s.split(","):
        t, _, p = part.strip().partition(":")
        try:
            pair = [float(t), float(p or 1.0)]
        except ValueError:
            raise SystemExit(f"--samplings: {part!r} is not temperature:top_p, e.g. 0.7:0.9"
                             ) from None
        if not (pair[0] > 0 and 0 < pair[1] <= 1):
            raise SystemExit(f"--samplings: {part!r} needs a temperature > 0 and a top_p in "
                             "(0, 1]")
        out.append(pair)
    return out


def _names(s: str, allowed) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {bad}; choose from {', '.join(allowed)}")
    return out


def parse_rates(s: str) -> list[float | str]:
    """'0.3,0.5,auto' -> [0.3, 0.5, 'auto'] (rates in [0, 1]; 'auto': the break-even rate
    from the plain pipelined row's hidden share, quickdraft.theory.shadow_break_even);
    '' -> []."""
    words = [x.strip() for x in s.split(",") if x.strip()]
    try:
        rates = [x if x == AUTO_RATE else float(x) for x in words]
    except ValueError:
        raise SystemExit(f"--shadow-keep-rates: {s!r} is not a comma list of numbers or "
                         f"{AUTO_RATE!r}, e.g. 0.3,0.5,{AUTO_RATE}") from None
    bad = [r for r in rates if r != AUTO_RATE and not 0.0 <= r <= 1.0]
    if bad:
        raise SystemExit(f"--shadow-keep-rates: {bad} outside [0, 1]")
    return rates


def add_measure_options(ap: argparse.ArgumentParser, *, samplings: str) -> None:
    """The options of how quickdraft's systems are measured (:func:`qd_spec`), for every
    script that runs the qd task; ``samplings``: their default."""
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=4, help="main draft length (all systems)")
    ap.add_argument("--gammas", default="1..8", help="gamma sweep, e.g. 1..8 or 1,2,4")
    ap.add_argument("--samplings", default=samplings,
                    help="sampled runs of quickdraft, as temperature:top_p pairs "
                    "(autoregressive and speculative side by side, seeded per prompt); "
                    f"'none' for greedy only (default {samplings})")
    ap.add_argument("--sampling-gammas", default="",
                    help="gammas of the sampled runs, e.g. 4,7 (default: --gamma)")
    ap.add_argument("--pipelined", default="",
                    help="gammas of pipelined greedy decoding on the fast path (the draft "
                    "drafting beside the verification), e.g. 4,8; '' for none")
    ap.add_argument("--shadow-keep-rates", default="",
                    help="pipelined rows again with a ShadowRule of each min_keep_rate "
                    "(continuations only while the running keep rate reaches it), e.g. "
                    "0.3,0.5; 'auto': the break-even rate for the hidden share the plain "
                    "pipelined row measured at the same gamma")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep-repeats", type=int, default=1)
    ap.add_argument("--cost-reps", type=int, default=10)
    ap.add_argument("--cache", default="run", choices=["run", "export"],
                    help="quickdraft's static cache length: sized to the run (prompt + new "
                         "tokens + two verify steps, as onnxruntime-genai sizes its own; the "
                         "default) or the export's default (its max_cache_length)")
    ap.add_argument("--no-cuda-graph", action="store_true",
                    help="fast path without CUDA graphs")
    ap.add_argument("--attention", default=None, choices=sorted(ATTENTION_KERNELS),
                    help="fast path: GroupQueryAttention's CUDA kernel (default: "
                         "load_pair's)")
    ap.add_argument("--fuse-gate-up", action=argparse.BooleanOptionalAction, default=None,
                    help="fast path's export: gate and up projections as one MatMul "
                         "(default: the export's)")
    ap.add_argument("--transpose-weights", action=argparse.BooleanOptionalAction,
                    default=None, help="fast path's export: MatMul weights stored "
                    "transposed, FusedMatMul(transB=1) (default: the export's)")


def parse_measure_options(args: argparse.Namespace) -> None:
    """:func:`add_measure_options`' strings to lists, in place."""
    args.gammas = parse_ints(args.gammas)
    args.pipelined = parse_ints(args.pipelined) if args.pipelined else []
    args.shadow_keep_rates = parse_rates(args.shadow_keep_rates)
    args.samplings = parse_samplings(args.samplings)
    args.sampling_gammas = (parse_ints(args.sampling_gammas) if args.sampling_gammas
                            else [args.gamma])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, tiny pairs (trained + tiny), few tokens: checks the pipeline")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default: $OUT, else runs/bench-out)")
    ap.add_argument("--work", type=Path, default=None,
                    help="models and cumulative results (default /tmp/qdbench; smoke: "
                         "/tmp/qdbench-smoke)")
    ap.add_argument("--pairs", default=None, help=f"comma list of {', '.join(PAIRS)}")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="comma list of " + ", ".join(STAGES))
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma list of " + ", ".join(SYSTEMS))
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--budget", type=float, default=560.0,
                    help="seconds this call may spend: no task starts after it (default 560)")
    add_measure_options(ap, samplings="1.0:1.0,0.7:0.9")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="prompts per pair (default: 4 trained, 1 random)")
    ap.add_argument("--alphas", default="0.6,0.8,0.9", help="controlled-alpha runs")
    ap.add_argument("--controlled", default="random",
                    choices=["random", "all", "none"],
                    help="pairs that get the controlled-alpha drafter (default: random pairs)")
    ap.add_argument("--hf-gammas", default=None,
                    help="assisted-generation gammas (default: --gamma only)")
    ap.add_argument("--hf-env", default="auto", choices=["auto", "keep", "clear"],
                    help="HF worker PYTHONPATH: keep (e.g. /tmp/site's transformers 4.57), "
                         "clear (the machine's own transformers), auto (keep, then clear if "
                         "that fails)")
    ap.add_argument("--hf-repeats", type=int, default=None,
                    help="timed runs for Hugging Face (slow on a busy host; default --repeats)")
    ap.add_argument("--export-validate", action="store_true",
                    help="let the exporters validate against PyTorch (slower)")
    ap.add_argument("--agreement", type=float, default=0.8,
                    help="random pairs: fraction of tokens where the draft agrees (~alpha)")
    ap.add_argument("--target-seconds", type=float, default=None, help="train: target budget")
    ap.add_argument("--draft-seconds", type=float, default=None, help="train: draft budget")
    ap.add_argument("--target-lr", type=float, default=None, help="train: target peak lr")
    ap.add_argument("--draft-lr", type=float, default=None, help="train: draft peak lr")
    ap.add_argument("--target-steps", type=int, default=None)
    ap.add_argument("--draft-steps", type=int, default=None)
    ap.add_argument("--distill-weight", type=float, default=None,
                    help="train: draft loss w * KL(target || draft) + (1 - w) * CE "
                         "(default 0.9; 0 = cross entropy alone)")
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--corpus-mb", type=float, default=None)
    ap.add_argument("--compile", action="store_true", help="train: torch.compile")
    ap.add_argument("--draft-shape", default=None,
                    help="train: the draft as HIDDENxLAYERS, e.g. 512x1 (default 256x2), or "
                         "targetxLAYERS (the target's first layers)")
    ap.add_argument("--force", default="",
                    help="comma list of stages to redo even if their output exists")
    ap.add_argument("--clean", action="store_true",
                    help="delete the model folders of pairs not in --pairs first (disk)")
    ap.add_argument("--tag", default="", help="a name for this call in the results")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.pairs = args.pairs or "trained,tiny"
        args.new_tokens, args.prompt_len = 16, 8
        args.gamma, args.gammas, args.alphas = 2, "1..3", "0.6,0.9"
        args.samplings = "1.0:1.0"
        args.repeats, args.cost_reps = 2, 3
        args.budget = max(args.budget, 1800.0)
        args.work = args.work or Path("/tmp/qdbench-smoke")
        args.out = args.out or REPO / "runs" / "bench-smoke"
    args.device = args.device or "cuda"
    args.pairs = _names(args.pairs or "1b", PAIRS)
    args.stages = _names(args.stages, STAGES)
    args.systems = _names(args.systems, SYSTEMS)
    parse_measure_options(args)
    args.alphas = parse_floats(args.alphas)
    if args.draft_shape:
        from benchmarks.train_pair import draft_shape

        try:
            args.draft_shape = draft_shape(args.draft_shape)
        except ValueError as e:
            raise SystemExit(f"--draft-shape: {e}") from None
    args.hf_gammas = parse_ints(args.hf_gammas) if args.hf_gammas else [args.gamma]
    args.force = [x for x in args.force.split(",") if x]
    args.work = (args.work or Path("/tmp/qdbench")).resolve()
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       REPO / "runs" / "bench-out")
    args.out = Path(out).resolve()
    return args


def common_spec(a: argparse.Namespace, pair_dir: Path) -> dict:
    """What every system's worker task takes from the measurement options ``a``."""
    return {"pair_dir": str(pair_dir), "device": a.device, "new_tokens": a.new_tokens,
            "gamma": a.gamma, "gammas": a.gammas, "warmup": a.warmup, "repeats": a.repeats,
            "sweep_repeats": a.sweep_repeats, "cache": a.cache}


def qd_spec(a: argparse.Namespace, pair_dir: Path, path: str, controlled: bool) -> dict:
    """The ``qd`` worker task's spec: quickdraft's ``path`` ("fast" or "generic") on the
    pair in ``pair_dir``, measured as the options ``a`` say."""
    return {**common_spec(a, pair_dir), "path": path,
            "alphas": a.alphas if controlled else [], "controlled": controlled,
            "cost_reps": a.cost_reps, "samplings": a.samplings,
            "sampling_gammas": a.sampling_gammas,
            "pipelined": a.pipelined if path == "fast" else [],
            "shadow_keep_rates": a.shadow_keep_rates if path == "fast" else [],
            "cuda_graph": not a.no_cuda_graph, "attention": a.attention, "seed": 0}


class Bench:
    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args = args
        self.t0 = time.monotonic()
        self.work = args.work
        self.out = args.out
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = load_json(self.work / "results.json") or {}
        r = self.results
        r.setdefault("schema", SCHEMA)
        r.setdefault("calls", [])
        r.setdefault("pairs", {})
        r.setdefault("errors", [])
        r["calls"].append({"command": "python benchmarks/bench.py " + shlex.join(argv),
                           "tag": args.tag, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        r["environment"] = environment()
        r["settings"] = {k: getattr(args, k) for k in (
            "device", "new_tokens", "prompt_len", "gamma", "gammas", "alphas", "samplings",
            "sampling_gammas", "hf_gammas",
            "warmup", "repeats", "sweep_repeats", "cost_reps", "agreement", "smoke")}
        r["settings"]["cuda_graph"] = not args.no_cuda_graph
        from quickdraft.export.builder import FUSE_GATE_UP, TRANSPOSE_WEIGHTS
        from quickdraft.ort_backend.device import DEFAULT_ATTENTION

        r["settings"]["attention"] = args.attention or DEFAULT_ATTENTION
        r["settings"]["fuse_gate_up"] = (FUSE_GATE_UP if args.fuse_gate_up is None
                                         else args.fuse_gate_up)
        r["settings"]["transpose_weights"] = (TRANSPOSE_WEIGHTS
                                              if args.transpose_weights is None
                                              else args.transpose_weights)
        self.first_error = len(r["errors"])  # errors of earlier calls are not this call's
        self.save()

    # -- bookkeeping -------------------------------------------------------------------

    def remaining(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def save(self) -> None:
        from benchmarks.report import goals, records

        r = self.results
        try:
            r["records"] = records(r)
            r["goals"] = goals(r)
        except Exception as e:  # noqa: BLE001 - never lose results to the report code
            r["report_error"] = repr(e)
        dump_json(self.work / "results.json", r)
        dump_json(self.out / "results.json", r)

    def note_error(self, exc: BaseException, **where) -> None:
        rec = error_record(exc, **where)
        self.results["errors"].append({**rec, "where": where})
        log(f"ERROR {where}: {rec['type']}: {rec['message'][:300]}")
        self.save()

    def pair_dir(self, name: str) -> Path:
        return self.work / "pairs" / name

    def pair_entry(self, name: str) -> dict:
        entry = self.results["pairs"].setdefault(name, {})
        entry.setdefault("tasks", {})
        entry.setdefault("systems", {})
        return entry

    def run_task(self, task: str, key: str, spec: dict, *, pythonpath: str | None = None,
                 env: dict | None = None) -> dict | None:
        """Run one worker; its result dict (None when skipped for the budget)."""
        left = self.remaining()
        if left < MIN_SECONDS.get(task, 20):
            log(f"skip {key}: {left:.0f}s of budget left")
            self.results["errors"].append({"kind": "skipped", "where": {"task": key},
                                           "message": f"skipped: {left:.0f}s of budget left"})
            self.save()
            return None
        res = run_worker(task, key, spec, self.work / "tasks", timeout=left - 3,
                         env=env, pythonpath=pythonpath)
        for e in res.get("errors") or []:
            self.results["errors"].append({**e, "where": {"task": key}})
        log(f"{key}: {res.get('status')} in {res['wall_seconds']:.0f}s")
        return res

    # -- stages ------------------------------------------------------------------------

    def bandwidth(self) -> None:
        if self.results.get("bandwidth") and "bandwidth" not in self.args.force:
            log("bandwidth: measured earlier")
            return
        res = self.run_task("bandwidth", "bandwidth", {"device": self.args.device})
        if res and res.get("bandwidth"):
            self.results["bandwidth"] = res["bandwidth"]
        self.save()

    def make_pair(self, name: str) -> None:
        a, d = self.args, self.pair_dir(name)
        entry = self.pair_entry(name)
        done = (d / "pair.json").is_file() and (d / "hf" / "target" / "config.json").is_file() \
            and (d / "hf" / "draft" / "config.json").is_file()
        stage = "train" if name == "trained" else "make"
        if done and stage not in a.force:
            log(f"{name}: pair already made ({d})")
        elif stage not in a.stages:
            log(f"{name}: stage {stage} not selected and the pair does not exist")
        else:
            if d.exists():
                shutil.rmtree(d)
            entry["systems"] = {}  # measured on the old weights
            if name == "trained":
                overrides = {"target_seconds": a.target_seconds, "draft_seconds": a.draft_seconds,
                             "target_steps": a.target_steps, "draft_steps": a.draft_steps,
                             "distill_weight": a.distill_weight,
                             "target_lr": a.target_lr, "draft_lr": a.draft_lr,
                             "batch": a.train_batch, "corpus_mb": a.corpus_mb,
                             "prompt_len": a.prompt_len, "num_prompts": a.num_prompts,
                             "compile": a.compile or None, "draft": a.draft_shape}
                if a.smoke:
                    overrides["num_prompts"] = a.num_prompts or 2
                spec = {"pair_dir": str(d), "device": a.device, "smoke": a.smoke,
                        "overrides": overrides}
                res = self.run_task("train", f"{name}/train", spec,
                                    env={"TOKENIZERS_PARALLELISM": "true"})
            else:
                spec = {"pair_dir": str(d), "device": a.device, "name": name,
                        "num_prompts": a.num_prompts or 1, "prompt_len": a.prompt_len,
                        "agreement": a.agreement}
                res = self.run_task("make", f"{name}/make", spec)
            if res is not None:
                entry["tasks"][stage] = {k: res.get(k) for k in ("status", "wall_seconds",
                                                                 "errors")}
        info = load_json(d / "pair.json")
        if info:
            entry["info"] = info
        self.save()

    def export(self, name: str, path: str) -> None:
        a, d = self.args, self.pair_dir(name)
        out = d / f"qd-{path}"
        if (out / "target" / "quickdraft.json").is_file() and \
                (out / "draft" / "quickdraft.json").is_file() and "export" not in a.force:
            log(f"{name}: qd-{path} already exported")
            return
        if not (d / "hf" / "target").is_dir():
            log(f"{name}: no Hugging Face folders: cannot export")
            return
        res = self.run_task("export", f"{name}/export-{path}", {
            "pair_dir": str(d), "path": path, "device": a.device,
            "validate": a.export_validate, "fuse_gate_up": a.fuse_gate_up,
            "transpose_weights": a.transpose_weights})
        if res is not None:
            self.pair_entry(name)["tasks"][f"export-{path}"] = {
                k: res.get(k) for k in ("status", "wall_seconds", "export", "errors")}
        self.save()

    def genai_build(self, name: str) -> None:
        from benchmarks import genai

        a, d = self.args, self.pair_dir(name)
        if genai.has_builds(d) and "build" not in a.force:
            log(f"{name}: onnxruntime-genai models present ({genai.genai_model_dirs(d)[0]})")
            return
        res = self.run_task("genai-build", f"{name}/genai-build",
                            {"pair_dir": str(d), "device": a.device})
        if res is not None:
            self.pair_entry(name)["tasks"]["genai-build"] = {
                k: res.get(k) for k in ("status", "wall_seconds", "builds", "errors")}
        self.save()

    def systems(self, name: str) -> None:
        a, d = self.args, self.pair_dir(name)
        entry = self.pair_entry(name)
        if not (d / "prompts.json").is_file():
            log(f"{name}: no pair, no systems")
            return
        controlled = a.controlled == "all" or (a.controlled == "random" and name != "trained")
        common = common_spec(a, d)
        reference = None
        for system in a.systems:
            key = f"{name}/{system}"
            old = entry["systems"].get(system) or {}
            if old.get("status") == "ok" and "systems" not in a.force:
                log(f"{key}: measured earlier in this work folder (--force systems to redo)")
                if system.startswith("qd-") and reference is None:
                    reference = old.get("reference_tokens")
                continue
            if system.endswith("-graph") and a.device != "cuda":
                entry["systems"][system] = {"status": "unavailable", "errors": [{
                    "kind": "unavailable", "message": "CUDA graphs need CUDA"}]}
                continue
            if system.startswith("qd-"):
                res = self.run_task("qd", key, qd_spec(a, d, system[3:], controlled))
                if res and res.get("reference_tokens") and reference is None:
                    reference = res["reference_tokens"]
            elif system.startswith("genai"):
                variant = {"genai": "ar", "genai-graph": "ar-graph", "genai-spec": "spec",
                           "genai-spec-graph": "spec-graph"}[system]
                # speedup and c over genai's own autoregressive run of the same kind
                # (with CUDA graphs for genai-spec-graph, without for genai-spec)
                ar_system = "genai-graph" if system.endswith("graph") else "genai"
                ar = (entry["systems"].get(ar_system) or {}).get("ar") or {}
                res = self.run_task("genai", key, {
                    **common, "variant": variant, "reference_tokens": reference,
                    "ar_ms_per_token": ar.get("ms_per_token")})
            else:  # hf
                spec = {**common, "hf_gammas": a.hf_gammas, "reference_tokens": reference,
                        "repeats": a.hf_repeats or a.repeats}
                res = None
                if a.hf_env in ("auto", "keep"):
                    res = self.run_task("hf", key, spec)
                if a.hf_env == "clear" or (a.hf_env == "auto" and res is not None
                                           and not res.get("ar")):
                    log("hf: again with the machine's own transformers (PYTHONPATH cleared)")
                    first = res
                    res = self.run_task("hf", key + "-system", spec, pythonpath="")
                    if res is not None and first is not None:
                        res["first_attempt"] = {k: first.get(k) for k in ("status", "errors",
                                                                          "versions")}
            if res is not None:
                entry["systems"][system] = res
            self.save()

    # -- the plan ----------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        log(f"quickdraft benchmark: pairs {a.pairs}, stages {a.stages}, systems {a.systems}, "
            f"device {a.device}, budget {a.budget:.0f}s, work {self.work}, out {self.out}")
        if a.clean:
            for p in PAIRS:
                if p not in a.pairs and self.pair_dir(p).exists():
                    log(f"clean: removing {self.pair_dir(p)}")
                    shutil.rmtree(self.pair_dir(p), ignore_errors=True)
        if "bandwidth" in a.stages:
            try:
                self.bandwidth()
            except Exception as e:  # noqa: BLE001
                self.note_error(e, stage="bandwidth")
        for name in a.pairs:
            steps = [("pair", lambda n=name: self.make_pair(n))]
            if "export" in a.stages:
                for path in ("fast", "generic"):
                    if f"qd-{path}" in a.systems:
                        steps.append((f"export-{path}", lambda n=name, p=path: self.export(n, p)))
            if "build" in a.stages and any(s.startswith("genai") for s in a.systems):
                steps.append(("genai-build", lambda n=name: self.genai_build(n)))
            if "systems" in a.stages:
                steps.append(("systems", lambda n=name: self.systems(n)))
            for label, fn in steps:
                try:
                    usage = shutil.disk_usage(self.work)
                    log(f"== {name}: {label} ({self.remaining():.0f}s of budget left, "
                        f"{usage.free / 2**30:.1f} GiB free)")
                    fn()
                except Exception as e:  # noqa: BLE001 - record and go on
                    self.note_error(e, pair=name, stage=label)
        self.results["calls"][-1]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.results["calls"][-1]["seconds"] = round(time.monotonic() - self.t0, 1)
        self.save()
        from benchmarks.report import render

        text = render(self.results)
        (self.out / "table.md").write_text(text)
        print("\n" + "=" * 100 + "\n" + text, flush=True)
        errors = [e for e in self.results["errors"][self.first_error:]
                  if e.get("kind") == "error"]
        log(f"done in {time.monotonic() - self.t0:.0f}s: {len(errors)} errors, results in "
            f"{self.out / 'results.json'}")
        if a.smoke and errors:
            log("smoke run FAILED: errors above")
            return 1
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logf = open(args.out / "bench.log", "a", buffering=1)
    sys.stdout = Tee(sys.__stdout__, logf)
    sys.stderr = Tee(sys.__stderr__, logf)
    try:
        return Bench(args, argv).run()
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        logf.close()


if __name__ == "__main__":
    raise SystemExit(main())
