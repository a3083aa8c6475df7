"""Local text for models built offline: the Python standard library's own sources."""

from __future__ import annotations

import sysconfig
from pathlib import Path

__all__ = ["stdlib_files", "stdlib_text"]


def stdlib_files(limit: int | None = None, skip: int = 0) -> list[Path]:
    """Python files of the standard library, sorted by path (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )
    files = files[skip:]
    return files[:limit] if limit is not None else files


def stdlib_text(max_chars: int = 2_000_000, skip_files: int = 0) -> str:
    """Concatenated standard-library sources, up to ``max_chars`` characters."""
    parts, size = [], 0
    for path in stdlib_files(skip=skip_files):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n".join(parts)[:max_chars]
