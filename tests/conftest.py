"""Shared fixtures: tiny local models and their ONNX exports, built once per session.

Everything runs offline: the hub is switched off and caches go to a temporary folder.
"""

from __future__ import annotations

import os
import tempfile

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
    from pathlib import Path

    folder = Path(source)
    if not folder.is_dir():
        return (str(source),)
    return (str(folder.resolve()),) + tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
        if p.is_file())


@pytest.fixture(scope="session", autouse=True)
def one_builder_run_per_input(tmp_path_factory):
    """onnxruntime-genai's model builder (a child process of a few seconds) runs once per
    distinct source and settings in a session; a later identical run gets a copy of its
    output. What quickdraft does with that output is still done, and tested, every time."""
    import shutil

    try:
        from quickdraft.export import builder
    except ImportError:
        yield
        return
    real = builder.run_builder
    store = tmp_path_factory.mktemp("builder-outputs")
    done: dict = {}

    def run_once(source, out_dir, *, dtype, device, cache_dir, local=True,
                 extra_options=None, **kwargs):
        key = (_fingerprint(source), dtype, device, local,
               tuple(sorted((extra_options or {}).items())))
        if key not in done:
            output = real(source, out_dir, dtype=dtype, device=device, cache_dir=cache_dir,
                          local=local, extra_options=extra_options, **kwargs)
            snapshot = store / str(len(done))
            shutil.copytree(out_dir, snapshot)
            done[key] = (snapshot, output)
            return output
        snapshot, output = done[key]
        shutil.copytree(snapshot, out_dir, dirs_exist_ok=True)
        return output

    patch = pytest.MonkeyPatch()
    patch.setattr(builder, "run_builder", run_once)
    yield
    patch.undo()


def _needs_export_stack():
    for name in ("torch", "transformers", "optimum.exporters.onnx", "onnxruntime", "onnx"):
        pytest.importorskip(name)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (512 tokens) trained on standard-library sources."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from quickdraft.export.toy import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(path, vocab_size=512)
    return path


def _make_pair(tmp_path_factory, tokenizer_dir, arch: str):
    from quickdraft.export.toy import make_random_model

    root = tmp_path_factory.mktemp(f"hf-{arch}")
    dirs = {}
    for role, seed in (("target", 0), ("draft", 1)):
        dirs[role] = root / role
        make_random_model(arch, dirs[role], tokenizer_dir, role=role, seed=seed)
    return dirs


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

    out = tmp_path_factory.mktemp("onnx-llama") / "pair"
    export_pair(hf_pair_dirs["target"], hf_pair_dirs["draft"], out)
    return out


@pytest.fixture(scope="session")
def static_llama_pair(tmp_path_factory, hf_pair_dirs):
    """The tiny Llama pair exported by the CLI verb with --kv-cache static (caches of 200
    tokens), once per session."""
    for name in ("onnxruntime_genai", "onnx_ir"):
        pytest.importorskip(name)
    from quickdraft.cli import main as cli_main

    out = tmp_path_factory.mktemp("static") / "pair"
    rc = cli_main(["export", "--target", str(hf_pair_dirs["target"]), "--draft",
                   str(hf_pair_dirs["draft"]), "--out", str(out), "--kv-cache", "static",
                   "--max-length", "200", "--steps", "8"])
    assert rc == 0
    return out
