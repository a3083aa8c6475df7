"""The documentation cannot rot: its code runs, its printed output matches, and the site builds.

- Every fenced ```python block of every page under docs/ runs, in order, in one namespace
  per page. A block preceded (on the line before the fence) by ``<!-- docs-test: skip -->``
  is shown but not run.
- A ```text block titled "Output" (``` text title="Output" ```) right after a Python block
  must equal what that block printed (trailing spaces and blank lines aside).
- ``mkdocs build --strict`` succeeds into a temporary folder, offline.
- scripts/make_plots.py draws every plot the pages show, and tolerates benchmark JSON of
  unknown shape.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- docs-test: skip -->"
# pages that teach by running code: each must have at least one Python block
MUST_RUN = ["tutorials/numpy-reference.md", "tutorials/export.md", "tutorials/onnxruntime.md"]
# pages whose code exports models with torch (tens of seconds each)
SLOW_PAGES = {"tutorials/export.md", "tutorials/onnxruntime.md"}

FENCE = re.compile(r"^(?P<fence>`{3,})\s*(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$",
                   re.MULTILINE | re.DOTALL)


@dataclass
class Block:
    code: str
    line: int  # 1-based line of the opening fence
    expected_output: str | None  # the "Output" block right after it, if any
    skip: bool


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def python_blocks(markdown: str) -> list[Block]:
    """The top-level ```python blocks of a page, each with the Output block that follows."""
    fences = list(FENCE.finditer(markdown))
    blocks = []
    for i, m in enumerate(fences):
        info = m.group("info").strip()
        lang = info.split()[0].lstrip("{.").rstrip("}") if info else ""
        if lang not in ("python", "py"):
            continue
        start = m.start()
        before = markdown[:start].rstrip("\n").rsplit("\n", 1)[-1].strip()
        expected = None
        if i + 1 < len(fences):
            nxt = fences[i + 1]
            between = markdown[m.end() : nxt.start()]
            nxt_info = nxt.group("info")
            if not between.strip() and nxt_info.split()[:1] == ["text"] and re.search(
                r'title="Output"', nxt_info
            ):
                expected = nxt.group("body")
        blocks.append(Block(m.group("body"), markdown.count("\n", 0, start) + 1, expected,
                            before == SKIP_MARK))
    return blocks


def pages_with_code() -> list:
    params = []
    for p in sorted(DOCS.rglob("*.md")):
        if python_blocks(p.read_text()):
            rel = p.relative_to(DOCS).as_posix()
            marks = [pytest.mark.slow] if rel in SLOW_PAGES else []
            params.append(pytest.param(p, id=rel, marks=marks))
    return params


def test_block_parser():
    page = (
        "Intro\n\n```python\nprint(1)\n```\n\n```text title=\"Output\"\n1\n```\n\n"
        f"{SKIP_MARK}\n```python\nraise SystemExit\n```\n\n```bash\nls\n```\n"
    )
    blocks = python_blocks(page)
    assert [(b.code, b.line, b.expected_output, b.skip) for b in blocks] == [
        ("print(1)\n", 3, "1\n", False),
        ("raise SystemExit\n", 12, None, True),
    ]


@pytest.mark.parametrize("page", MUST_RUN)
def test_tutorials_have_code(page):
    assert python_blocks((DOCS / page).read_text()), f"{page} has no Python block to run"


@pytest.mark.parametrize("path", pages_with_code())
def test_page_code_runs(path, tmp_path, monkeypatch):
    """Run the page's Python blocks in order and compare their printed output."""
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace: dict = {"__name__": "__docs__"}
    rel = path.relative_to(ROOT)
    for block in python_blocks(path.read_text()):
        if block.skip:
            continue
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(block.code, f"{rel}:{block.line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(
                f"{rel}, block at line {block.line} failed: {type(e).__name__}: {e}\n"
                f"--- printed so far ---\n{out.getvalue()}"
            ) from e
        if block.expected_output is not None:
            got, want = _normalise(out.getvalue()), _normalise(block.expected_output)
            assert got == want, (
                f"{rel}, block at line {block.line}: printed output differs from the page's "
                f"Output block.\n--- page ---\n{want}\n--- printed ---\n{got}"
            )


def _load_make_plots():
    spec = importlib.util.spec_from_file_location("make_plots", ROOT / "scripts" / "make_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_plots_theory(tmp_path):
    plots = _load_make_plots()
    written = plots.make_theory_plots(tmp_path)
    names = sorted(p.name for p in written)
    assert names == sorted(["expected_tokens.png", "walltime_improvement.png",
                            "best_gamma.png", "operations_factor.png", "hierarchical.png"])
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (DOCS / "assets" / p.name).is_file(), f"docs/assets/{p.name} is not committed"


def test_make_plots_benchmarks_tolerant(tmp_path):
    plots = _load_make_plots()
    results = tmp_path / "results"
    out = tmp_path / "out"
    notes: list[str] = []
    # nothing there: no error, no plot
    assert plots.make_benchmark_plots(results, out, log=notes.append) == []
    results.mkdir()
    (results / "broken.json").write_text("{not json")
    (results / "foreign.json").write_text(json.dumps({"hello": [1, 2, 3]}))
    (results / "sweep.json").write_text(json.dumps({"results": [
        {"label": "cpu", "gamma": g, "speedup": 1 + 0.1 * g, "alpha": 0.8, "c": 0.05,
         "tokens_per_second": 10.0 * g}
        for g in (1, 2, 4)
    ] + [{"gamma": "x"}, "junk"]}))
    written = plots.make_benchmark_plots(results, out, log=notes.append)
    assert sorted(p.name for p in written) == [
        "benchmark_sweep_speedup.png", "benchmark_sweep_tokens_per_second.png"]
    assert any("broken.json" in n for n in notes) and any("foreign.json" in n for n in notes)


def test_pages_use_only_committed_images():
    """Every image a page shows exists under docs/ (mkdocs only warns on some of these)."""
    missing = []
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", page.read_text()):
            if "://" not in target and not (page.parent / target).resolve().is_file():
                missing.append(f"{page.relative_to(DOCS)} -> {target}")
    assert not missing, missing


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec(
        "mkdocstrings_handlers"
    ) is None:
        pytest.fail("the docs extra is not installed: pip install -e '.[docs]'")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", DISABLE_MKDOCS_2_WARNING="true")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
         "--config-file", str(ROOT / "mkdocs.yml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    assert (site / "explanation" / "exactness" / "index.html").is_file()
    api = (site / "reference" / "verification" / "index.html").read_text()
    assert "verify_batch" in api, "the API reference did not render the docstrings"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "usage: quickdraft" in cli, "the CLI page lacks the parser's help"
