"""``quickdraft serve``: an OpenAI-compatible HTTP server over one loaded pair.

Needs the ``serve`` extra (``pip install quickdraft[serve]``). The names below are loaded
on first use, so importing the package (the CLI does) needs no web framework.
"""

from __future__ import annotations

from quickdraft.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "Engine", "Scheduler"]


def __getattr__(name: str):
    if name in ("create_app", "Engine"):
        from quickdraft.serve import app

        return getattr(app, name)
    if name == "Scheduler":
        from quickdraft.serve.scheduler import Scheduler

        return Scheduler
    raise AttributeError(f"module 'quickdraft.serve' has no attribute {name!r}")
