"""Shared fixtures: tiny local models and their ONNX exports, built once per session.

Everything runs offline: the hub is switched off and caches go to a temporary folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# before anything imports transformers or huggingface_hub (they read these at import time)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
_CACHE = tempfile.mkdtemp(prefix="quickdraft-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
os.environ["HF_HOME"] = os.path.join(_CACHE, "huggingface")

import pytest  # noqa: E402

# the hypothesis profiles ("ci": derandomized) are registered in the repository's conftest.py

def _fingerprint(source) -> tuple:
    """A model source as the builder sees it: a local folder's files (names, sizes, mtimes),
    else the name."""
    folder = Path(source)
    if not folder.is_dir():
        return (str(source),)
    return (str(folder.resolve()),) + tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
        if p.is_file())


# a folder that several pytest runs share (scripts/test.sh sets it, new, for its two runs):
# the fixtures built there once serve both; a later run gets the model builder's graphs as
# the first run's onnxruntime made them, so the folder must not outlive one invocation
ACROSS_RUNS = os.environ.get("QUICKDRAFT_TEST_SHARED")


def _shared_root(tmp_path_factory, across_runs: bool = False) -> Path:
    """A folder of this run that every pytest-xdist worker sees (the workers' temporary
    folders share a parent), so a fixture built by one worker is not built again by the
    other; with ``across_runs``, :data:`ACROSS_RUNS` where it is set."""
    if across_runs and ACROSS_RUNS:
        root = Path(ACROSS_RUNS)
    else:
        base = tmp_path_factory.getbasetemp()
        root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(parents=True, exist_ok=True)
    return root


def built_once(tmp_path_factory, name: str, build, *, across_runs: bool = False) -> Path:
    """``build(path)`` run once per test run for ``name`` (under a lock, the other workers
    waiting for it), its folder then shared; a build that failed is run again.
    ``across_runs``: once for the runs sharing :data:`ACROSS_RUNS`."""
    import shutil

    from filelock import FileLock

    root = _shared_root(tmp_path_factory, across_runs)
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if path.exists():
                shutil.rmtree(path)
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session", autouse=True)
def one_builder_run_per_input(tmp_path_factory):
    """onnxruntime-genai's model builder (a child process of about 10 s here) runs once per
    distinct source and settings in a test run, whichever worker asks first; a later
    identical run gets a copy of its output. What quickdraft does with that output is
    still done, and tested, every time."""
    import functools
    import hashlib
    import shutil

    try:
        from quickdraft.export import builder
    except ImportError:
        yield
        return
    real = builder.run_builder

    @functools.wraps(real)  # inspect.unwrap(builder.run_builder): the real one
    def run_once(source, out_dir, *, dtype, device, cache_dir, local=True,
                 extra_options=None, **kwargs):
        key = (_fingerprint(source), dtype, device, local,
               tuple(sorted((extra_options or {}).items())))
        name = "builder-" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]

        def build(snapshot: Path) -> None:
            output = real(source, out_dir, dtype=dtype, device=device, cache_dir=cache_dir,
                          local=local, extra_options=extra_options, **kwargs)
            shutil.copytree(out_dir, snapshot / "out")
            (snapshot / "output.txt").write_text(output)

        snapshot = built_once(tmp_path_factory, name, build, across_runs=True)
        shutil.copytree(snapshot / "out", out_dir, dirs_exist_ok=True)
        return (snapshot / "output.txt").read_text()

    patch = pytest.MonkeyPatch()
    patch.setattr(builder, "run_builder", run_once)
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def one_builder_child():
    """Every builder job of this pytest worker runs in one child process (torch,
    transformers and the builder imported once, about 7 s, not once per job); started at
    the worker's first job, ended with the session."""
    try:
        from quickdraft.export.builder import builder_session
    except ImportError:
        yield None
        return
    with builder_session() as session:
        yield session


def _needs_export_stack():
    for name in ("torch", "transformers", "optimum.exporters.onnx", "onnxruntime", "onnx"):
        pytest.importorskip(name)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (512 tokens) trained on standard-library sources."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from quickdraft.export.toy import train_tokenizer

    return built_once(tmp_path_factory, "tokenizer",
                      lambda path: train_tokenizer(path, vocab_size=512), across_runs=True)


def _make_pair(tmp_path_factory, tokenizer_dir, arch: str):
    from quickdraft.export.toy import make_random_model

    def build(root: Path) -> None:
        for role, seed in (("target", 0), ("draft", 1)):
            make_random_model(arch, root / role, tokenizer_dir, role=role, seed=seed)

    root = built_once(tmp_path_factory, f"hf-{arch}", build, across_runs=True)
    return {role: root / role for role in ("target", "draft")}


@pytest.fixture(scope="session")
def hf_pair_factory(tmp_path_factory, tiny_tokenizer_dir):
    """hf_pair_factory(arch) -> {"target": Path, "draft": Path}: local Hugging Face folders
    of a random pair ("llama", "qwen2" or "gpt2"; target 2 layers, draft 1), built once."""
    _needs_export_stack()
    built = {}

    def make(arch: str):
        if arch not in built:
            built[arch] = _make_pair(tmp_path_factory, tiny_tokenizer_dir, arch)
        return built[arch]

    return make


@pytest.fixture(scope="session")
def hf_pair_dirs(hf_pair_factory):
    """Local Hugging Face folders of a random Llama pair: {"target": Path, "draft": Path}."""
    return hf_pair_factory("llama")


@pytest.fixture(scope="session")
def exported_llama_pair(tmp_path_factory, hf_pair_dirs):
    """OUT folder of the exported (and validated) tiny Llama pair: OUT/target, OUT/draft."""
    from quickdraft.export import export_pair

    def build(folder: Path) -> None:
        export_pair(hf_pair_dirs["target"], hf_pair_dirs["draft"], folder / "pair")

    return built_once(tmp_path_factory, "onnx-llama", build) / "pair"


@pytest.fixture(scope="session")
def static_llama_pair(tmp_path_factory, hf_pair_dirs):
    """The tiny Llama pair exported by the CLI verb with --kv-cache static (caches of 200
    tokens), once per session."""
    for name in ("onnxruntime_genai", "onnx_ir"):
        pytest.importorskip(name)
    from quickdraft.cli import main as cli_main

    def build(folder: Path) -> None:
        rc = cli_main(["export", "--target", str(hf_pair_dirs["target"]), "--draft",
                       str(hf_pair_dirs["draft"]), "--out", str(folder / "pair"), "--kv-cache",
                       "static", "--max-length", "200", "--steps", "8"])
        assert rc == 0

    return built_once(tmp_path_factory, "static", build) / "pair"
