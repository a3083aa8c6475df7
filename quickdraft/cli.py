"""The ``quickdraft`` command line. The CLI owns all output; library code stays silent.

Each verb lives with its part of the package and registers itself here through
``add_parser(subparsers)``, which sets ``func`` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# modules that provide verbs: each has add_parser(subparsers)
VERB_MODULES = [
    "quickdraft.reference.cli",  # theory, demo
    "quickdraft.export.cli",  # export
    "quickdraft.ort_backend.cli",  # generate
    "quickdraft.serve.cli",  # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quickdraft",
        description="Speculative decoding (Leviathan et al., 2023): exact and fast.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("quickdraft"):
                continue  # that part of the package is not present
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"quickdraft {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (e.g. `| head`): say so once, quietly
        _silence_stdout()
        print(f"quickdraft {args.command}: output closed before the end (broken pipe)",
              file=sys.stderr)
        return 141
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"quickdraft {args.command}: error: {e}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
