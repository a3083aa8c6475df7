"""MkDocs hook: generated content that must never drift from the code.

- ``<!-- quickdraft-cli-help -->`` becomes the live ``--help`` text of the ``quickdraft``
  command and of every verb that ``quickdraft.cli.build_parser`` registers. Verbs whose
  part of the package is not present are simply absent (``build_parser`` skips them).
- Sphinx roles left in docstrings (``:func:`x```, ``:class:`~a.B```, ...) become
  cross-references to the API pages where the name resolves, and plain code otherwise,
  instead of showing the role's text.
- ``<!-- quickdraft-benchmark-plots -->`` becomes the benchmark plots that
  ``scripts/make_plots.py`` drew into ``docs/assets/benchmark_*.png``, or a note that
  there are none yet.
"""

from __future__ import annotations

import argparse
import html
import os
import re
from pathlib import Path

CLI_MARKER = "<!-- quickdraft-cli-help -->"
BENCHMARK_MARKER = "<!-- quickdraft-benchmark-plots -->"


def _fence(text: str) -> str:
    return "```text\n" + text.rstrip() + "\n```\n"


def cli_help_markdown(width: int = 80) -> str:
    """The help of ``quickdraft`` and of each verb, as Markdown sections."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps help to the terminal width
    try:
        from quickdraft.cli import build_parser

        parser = build_parser()
        parts = ["## `quickdraft`\n", _fence(parser.format_help())]
        for action in parser._actions:  # argparse keeps subparsers only here
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    parts.append(f"## `quickdraft {name}`\n")
                    parts.append(_fence(sub.format_help()))
        return "\n".join(parts)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def benchmark_plots_markdown(docs_dir: Path, page_dir: Path) -> str:
    plots = sorted((docs_dir / "assets").glob("benchmark_*.png"))
    if not plots:
        return (
            '!!! info "No benchmark results yet"\n'
            "    No results are committed under `benchmarks/results/` yet, so there is "
            "nothing to plot.\n"
            "    This page fills itself in when they are: run `python scripts/make_plots.py` "
            "and rebuild.\n"
        )
    parts = []
    for png in plots:
        rel = os.path.relpath(png, page_dir).replace(os.sep, "/")
        title = png.stem.removeprefix("benchmark_").replace("_", " ")
        parts.append(f"### {title}\n\n![{title}]({rel})\n")
    return "\n".join(parts)


# ":func:" then the name as rendered: <code>~pkg.mod.name</code> (Google-style docstrings
# with reST roles, as griffe renders them)
ROLE_RE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|py:\w+):<code>(~?)([\w.]+)</code>")


def _role_to_autoref(match: re.Match) -> str:
    short, name = match.group(1), match.group(2)
    title = name.rsplit(".", 1)[-1] if short else name
    # "optional": mkdocs-autorefs links it when the name is documented, else leaves code
    return (f'<autoref identifier="{html.escape(name)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>")


def on_page_content(content: str, **kwargs) -> str:
    return ROLE_RE.sub(_role_to_autoref, content)


def on_page_markdown(markdown: str, page, config, **kwargs) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_help_markdown())
    if BENCHMARK_MARKER in markdown:
        docs_dir = Path(config["docs_dir"])
        page_dir = (docs_dir / page.file.src_path).parent
        markdown = markdown.replace(BENCHMARK_MARKER, benchmark_plots_markdown(docs_dir, page_dir))
    return markdown
