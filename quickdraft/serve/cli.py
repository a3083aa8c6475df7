"""``quickdraft serve``: the OpenAI-compatible server, with uvicorn or on Ray Serve."""

from __future__ import annotations

import argparse
import sys

from quickdraft.drafters import DRAFTERS
from quickdraft.ort_backend.cli import _gamma, add_attention_option

__all__ = ["add_parser", "run"]


def _positive_int(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    return parse


def _seconds(text: str, *, zero: bool = False) -> float:
    """A finite number of seconds above 0 (``zero``: 0 too)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a finite number {'>=' if zero else '>'} 0, got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve an exported pair over an OpenAI-compatible HTTP API",
        description=(
            "Serve an exported pair over HTTP: /v1/completions, /v1/chat/completions, "
            "/v1/models, /health and /metrics (Prometheus). One loaded pair; a scheduler "
            "thread decodes up to --max-concurrency streams at once, one speculative "
            "iteration each in turn, their proposals verified in one target call (--lanes). "
            "Same settings and seed: the same output as "
            "`quickdraft generate`. Needs the serve extra: pip install 'quickdraft[serve]'."
        ),
    )
    p.add_argument("--model-dir", metavar="OUT_DIR",
                   help="folder written by `quickdraft export`; default: the bundled pair "
                   "(on the CPU)")
    p.add_argument("--model-name", default=None,
                   help="the model name clients send (default: quickdraft-default for the "
                   "bundled pair, else the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1)")
    p.add_argument("--port", type=_positive_int(0, 65535), default=8000,
                   help="port (default 8000; 0: any free port)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default) uses CUDA when available (the bundled pair: the CPU)")
    add_attention_option(p)
    p.add_argument("--gamma", type=_gamma, default=None, metavar="N|auto",
                   help="default draft tokens per iteration, or auto (default 5; 2 for the "
                   "bundled pair); a request's gamma field overrides it")
    p.add_argument("--drafter", choices=DRAFTERS, default="model",
                   help="default drafting strategy (a request's drafter field overrides it)")
    p.add_argument("--max-concurrency", type=_positive_int(1), default=8,
                   help="streams decoded at once, each with its own caches (default 8)")
    p.add_argument("--lanes", type=_positive_int(0), default=None, metavar="N",
                   help="streams whose proposals one target call verifies (a static "
                   "export; each lane keeps a stream's caches from the start; default: "
                   "--max-concurrency, at most 16; 0: every stream verified alone)")
    p.add_argument("--no-draft-lanes", dest="draft_lanes", action="store_false",
                   help="with lanes: draft every stream's proposal alone (default: the "
                   "greedy streams' proposals run as one chain of the draft's lanes)")
    p.add_argument("--max-queue", type=_positive_int(0), default=64,
                   help="requests waiting for a stream; beyond it: 429 (default 64)")
    p.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                   help="seconds per request, queueing included: 504 (an error event in a "
                   "stream) past it (default: none)")
    p.add_argument("--shutdown-timeout", type=lambda t: _seconds(t, zero=True), default=10.0,
                   metavar="S",
                   help="on shutdown, seconds to finish in-flight requests before "
                   "cancelling them (default 10)")
    p.add_argument("--ray", action="store_true",
                   help="run as a Ray Serve deployment (needs ray[serve])")
    p.add_argument("--replicas", type=_positive_int(1), default=1,
                   help="with --ray: replicas, each loading the pair (default 1)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
    return p


def _settings(args):
    from quickdraft.serve.settings import ServeSettings

    return ServeSettings(model_dir=args.model_dir, model_name=args.model_name,
                         device=args.device, attention=args.attention, gamma=args.gamma,
                         drafter=args.drafter,
                         max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                         lanes=args.lanes, draft_lanes=args.draft_lanes,
                         timeout=args.timeout,
                         shutdown_timeout=args.shutdown_timeout)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)  # checks everything before importing or loading anything
    if args.replicas != 1 and not args.ray:
        raise ValueError("--replicas needs --ray (one process serves one replica)")
    try:
        import uvicorn

        from quickdraft.serve.app import create_app
    except ImportError as e:
        raise RuntimeError(f"the server needs the serve extra ({e}): pip install "
                           "'quickdraft[serve]'") from None
    if args.ray:
        from quickdraft.serve.ray_app import run_ray

        return run_ray(settings, replicas=args.replicas, host=args.host, port=args.port)
    print(f"quickdraft serve: {settings.served_name()} on http://{args.host}:{args.port}/v1 "
          f"(max concurrency {settings.max_concurrency}, queue {settings.max_queue}, lanes "
          f"{settings.resolved_lanes()})",
          file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port,
                log_level=args.log_level, lifespan="on",
                timeout_graceful_shutdown=settings.shutdown_timeout)
    return 0
