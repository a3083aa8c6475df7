"""Export of tiny random Hugging Face models to ONNX (CPU, offline)."""

from __future__ import annotations

import json

from quickdraft.export import load_manifest


def test_exported_llama_pair_layout(exported_llama_pair):
    for role in ("target", "draft"):
        folder = exported_llama_pair / role
        assert (folder / "model.onnx").is_file()
        assert (folder / "tokenizer.json").is_file()
        m = load_manifest(folder)
        assert m.architecture == "llama"
        assert m.kv_layout == "bnsh" and m.kv_cache == "dynamic"
        assert m.vocab_size == 512
        assert json.loads((folder / "quickdraft.json").read_text())["dtype"] == "fp32"
