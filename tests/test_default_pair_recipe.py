"""The bundled pair's recipe (scripts/train_default_pair.py) end to end at toy size: a corpus
folder, the target alone, the draft distilled on the target's own samples, the int8 static
export with its model card; and the training helpers it shares with benchmarks/."""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

for _name in ("torch", "transformers", "onnxruntime", "onnx", "onnxruntime_genai", "onnx_ir"):
    pytest.importorskip(_name)

import torch  # noqa: E402

from benchmarks import training  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import train_default_pair as recipe  # noqa: E402

TINY = ["--device", "cpu", "--vocab-size", "512", "--ctx", "128", "--batch", "4",
        "--target-layers", "1", "--target-hidden", "64", "--target-heads", "2",
        "--target-kv-heads", "1", "--target-intermediate", "128", "--draft-layers", "1",
        "--draft-hidden", "32", "--draft-heads", "1", "--draft-intermediate", "64",
        "--eval-windows", "4", "--eval-every", "10", "--log-every", "10", "--fast"]


def test_mixed_windows_draw_half_of_each_batch_from_the_extra_stream():
    g = torch.Generator().manual_seed(0)
    draw = lambda high, n: torch.randint(0, high, (n,), generator=g)  # noqa: E731
    batches = training.mixed_windows(torch.zeros(500, dtype=torch.long),
                                     torch.ones(300, dtype=torch.long), 6, 16, draw)
    batch = next(batches)
    assert batch.shape == (6, 17)
    assert (batch[:3] == 0).all() and (batch[3:] == 1).all()
    plain = next(training.mixed_windows(torch.zeros(500, dtype=torch.long), None, 6, 16, draw))
    assert plain.shape == (6, 17) and (plain == 0).all()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A corpus folder as --collect-corpus writes one, from 40 standard-library files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path_factory.mktemp("corpus")
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size < 60_000)[:40]
    for p in files:
        shutil.copyfile(p, root / p.name)
    (root / "LICENSES").mkdir()
    (root / "LICENSES" / "python-stdlib-LICENSE.txt").write_text("the license text\n")
    (root / recipe.CORPUS_MANIFEST).write_text(json.dumps({"sources": [
        {"name": "python-stdlib", "version": stdlib.name, "license": "PSF-2.0",
         "files": len(files), "chars": sum(p.stat().st_size for p in files),
         "license_file": "python-stdlib-LICENSE.txt"}]}))
    return root


def test_corpus_folder_holds_out_every_tenth_file(corpus):
    train, heldout, root = recipe.corpus_files(corpus)
    every = sorted(corpus.glob("*.py"))
    assert root == corpus.resolve() and len(train) + len(heldout) == len(every) == 40
    assert heldout == [p for i, p in enumerate(every) if i % 10 == 9]


def test_recipe_trains_distils_and_ships_an_int8_pair(corpus, tmp_path):
    first = tmp_path / "target-run"
    assert recipe.main([*TINY, "--corpus", str(corpus), "--out", str(first),
                        "--target-steps", "12", "--skip-draft"]) == 0
    out = tmp_path / "run"
    assert recipe.main([*TINY, "--corpus", str(corpus), "--out", str(out),
                        "--reuse-target", str(first / "target"), "--draft-steps", "12",
                        "--draft-samples", "8", "--sample-tokens", "16"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    draft = summary["models"]["draft"]
    assert draft["steps"] == 12 and draft["target_samples"]["tokens"] == 8 * 17
    held = summary["heldout"]
    for key in ("alpha_T0", "alpha_T1", "trajectory_alpha_T0", "trajectory_alpha_readme_T0"):
        assert 0.0 <= held[key] <= 1.0, key
    assert summary["corpus"]["sources"][0]["name"] == "python-stdlib"

    dest = tmp_path / "shipped"
    assert recipe.main(["--export-only", "--out", str(out), "--corpus", str(corpus),
                        "--export-dir", str(dest)]) == 0
    from quickdraft.export import load_manifest
    from quickdraft.ort_backend import DecodeConfig, load_pair

    for role in ("target", "draft"):
        m = load_manifest(dest / role)
        assert (m.kv_cache, m.weights) == ("static", "int8")
        assert (dest / role / "config.json").is_file()
    shipped = dest / "LICENSES" / "LICENSE-python-stdlib"  # the source's own, renamed
    assert shipped.read_text() == "the license text\n"
    card = (dest / "MODEL_CARD.md").read_text()
    record = json.loads((dest / "training.json").read_text())
    assert f"**{held['trajectory_alpha_T0']:.3f}**" in card
    assert record["cpu_latency"]["c"] > 0
    pair = load_pair(dest, device="cpu", max_gamma=3)
    config = DecodeConfig(max_new_tokens=12)
    with pair.generator(config, gamma=3) as spec, pair.generator(config) as auto:
        assert spec.generate("def f(x):").tokens == auto.generate("def f(x):").tokens
