"""Export of three models: a target, its draft and the draft's own draft (``--draft-draft``,
for hierarchical speculative decoding) to OUT/target, OUT/draft and OUT/draft_draft.

The tiny Llama pair of conftest.py plus a third, even smaller Llama with the same tokenizer;
CPU and offline. The vocabulary checks and the failure paths replace the export step, so
only the fixture's export and the CLI test run optimum-onnx.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import quickdraft.export.api as api  # noqa: E402
from quickdraft.cli import main as cli_main  # noqa: E402
from quickdraft.export import (  # noqa: E402
    ExportError,
    VocabularyMismatchError,
    check_three,
    export_pair,
    load_manifest,
    output,
)
from quickdraft.export.toy import make_random_model  # noqa: E402

ROLES = ["target", "draft", "draft_draft"]
# smaller than the draft (1 layer, hidden 32, 2 heads); head size 16 as the others, so a
# static export runs on the CPU's GroupQueryAttention too
DRAFT_DRAFT_SHAPE = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=1,
                         num_key_value_heads=1, intermediate_size=32)
STEPS = 8


def _make_draft_draft(folder: Path, tokenizer_dir: Path, **kw) -> Path:
    make_random_model("llama", folder, tokenizer_dir, role="draft", seed=2,
                      **{**DRAFT_DRAFT_SHAPE, **kw})
    return folder


@pytest.fixture(scope="module")
def three_dirs(tmp_path_factory, hf_pair_dirs, tiny_tokenizer_dir):
    """Local Hugging Face folders: the conftest Llama pair and a smaller draft_draft."""
    root = tmp_path_factory.mktemp("hf-three")
    dd = _make_draft_draft(root / "draft_draft", tiny_tokenizer_dir)
    return {**hf_pair_dirs, "draft_draft": dd}


@pytest.fixture(scope="module")
def exported_three(tmp_path_factory, three_dirs):
    """(OUT, report) of the three exported and validated with dynamic caches."""
    out = tmp_path_factory.mktemp("onnx-three") / "three"
    messages = []
    report = export_pair(three_dirs["target"], three_dirs["draft"], out, steps=STEPS,
                         draft_draft=three_dirs["draft_draft"], progress=messages.append)
    return out, report, messages


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _no_export(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an export started")

    monkeypatch.setattr(api, "_export_into", boom)


# -- the dynamic export of three models ----------------------------------------------------


def test_three_folders_manifests_and_marker(exported_three, three_dirs):
    out, report, messages = exported_three
    assert _files(out) == sorted([*ROLES, output.MARKER_NAME])
    # draft_draft holds the same kinds of files as draft: graph, tokenizer, manifest
    assert _files(out / "draft_draft") == _files(out / "draft")
    assert {"model.onnx", "quickdraft.json", "tokenizer.json"} <= set(_files(out / "draft"))
    manifests = {role: load_manifest(out / role) for role in ROLES}
    shapes = {role: (m.num_layers, m.hidden_size, m.num_attention_heads)
              for role, m in manifests.items()}
    assert shapes == {"target": (2, 64, 4), "draft": (1, 32, 2), "draft_draft": (1, 16, 1)}
    for role, m in manifests.items():
        assert m.kv_cache == "dynamic" and m.dtype == "fp32" and m.vocab_size == 512
        assert m.source == str(three_dirs[role])
        v = m.validation
        assert v["greedy_steps"] == STEPS and min(v["greedy_equal_steps"]) == STEPS, role
    assert (out / "draft_draft" / "tokenizer.json").read_bytes() == (
        out / "target" / "tokenizer.json").read_bytes()
    marker = json.loads((out / output.MARKER_NAME).read_text())
    assert marker["layout"] == "pair" and marker["roles"] == ROLES
    assert sorted(marker["models"]) == sorted(ROLES)
    assert marker["models"]["draft_draft"] == {"kv_cache": "dynamic",
                                              "source": str(three_dirs["draft_draft"])}
    # the report
    assert report.draft_draft is not None and report.draft_draft.role == "draft_draft"
    assert report.draft_draft.path == out / "draft_draft"
    assert [r.role for r in report.models] == ROLES
    d = report.to_dict()
    assert d["draft_draft"]["manifest"]["hidden_size"] == 16
    assert d["draft_draft"]["path"] == str(out / "draft_draft")
    assert any(m.startswith("draft_draft: validating") for m in messages), messages
    assert "checking the pair and the draft's draft" in messages


def test_the_runtime_still_loads_the_folder(exported_three):
    from quickdraft.ort_backend import load_pair

    out, _, _ = exported_three
    pair = load_pair(out, device="cpu")
    assert pair.target.manifest.num_layers == 2 and pair.draft.manifest.hidden_size == 32
    dd = getattr(pair, "draft_draft", None)  # loaded where the runtime knows the folder
    if dd is not None:
        assert dd.manifest.hidden_size == 16


def test_a_pair_report_has_no_draft_draft(exported_three):
    _, report, _ = exported_three
    from quickdraft.export.common import ExportReport

    pair = ExportReport(report.out, report.target, report.draft, report.seconds)
    assert pair.draft_draft is None and "draft_draft" not in pair.to_dict()
    assert [r.role for r in pair.models] == ["target", "draft"]


def test_cli_export_three(three_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["export", "--target", str(three_dirs["target"]), "--draft",
            str(three_dirs["draft"]), "--draft-draft", str(three_dirs["draft_draft"]),
            "--out", str(out), "--no-validate"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "draft_draft: exporting" in captured.err
    rows = [line.split() for line in captured.out.splitlines()[2:]]
    assert [r[0] for r in rows] == ROLES
    assert rows[2][-1] == str(out / "draft_draft")
    assert _files(out) == sorted([*ROLES, output.MARKER_NAME])

    assert cli_main([*argv, "--overwrite", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["draft_draft"]["manifest"]["hidden_size"] == 16
    assert report["draft_draft"]["manifest"]["validation"] == {}
    assert _files(out / "draft_draft") == _files(out / "draft")


# -- one vocabulary across the three, checked before any export ----------------------------


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory, tiny_tokenizer_dir):
    """Smaller models that differ from the shared vocabulary: a wider logits layer, and the
    same width with two tokens' ids swapped."""
    root = tmp_path_factory.mktemp("dd-mismatched")
    wide = _make_draft_draft(root / "wide", tiny_tokenizer_dir, vocab_size=600)
    swapped = _make_draft_draft(root / "swapped", tiny_tokenizer_dir)
    tj = swapped / "tokenizer.json"
    data = json.loads(tj.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = (tok for tok, i in vocab.items() if i in (100, 101))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tj.write_text(json.dumps(data), encoding="utf-8")
    return {"wide": wide, "swapped": swapped}


@pytest.mark.parametrize("which, match", [
    ("wide", r"vocabulary sizes differ \(draft vs draft_draft\): draft .* 512 logits, "
             r"draft_draft .* 600"),
    ("swapped", r"draft_draft and draft tokenizers differ: 2 tokens map to different ids"),
])
def test_a_third_model_of_another_vocabulary_is_refused(three_dirs, mismatched, which, match,
                                                        tmp_path, monkeypatch, capsys):
    _no_export(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(VocabularyMismatchError, match=match):
        export_pair(three_dirs["target"], three_dirs["draft"], out,
                    draft_draft=mismatched[which])
    with pytest.raises(VocabularyMismatchError, match=match):
        check_three(three_dirs["target"], three_dirs["draft"], mismatched[which])
    # the static path checks the same way, before its builder runs
    with pytest.raises(VocabularyMismatchError, match=match):
        export_pair(three_dirs["target"], three_dirs["draft"], out, kv_cache="static",
                    draft_draft=mismatched[which])
    rc = cli_main(["export", "--target", str(three_dirs["target"]), "--draft",
                   str(three_dirs["draft"]), "--draft-draft", str(mismatched[which]),
                   "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "quickdraft export: error:" in err and "draft_draft" in err
    assert list(tmp_path.iterdir()) == []


def test_a_bad_draft_is_named_as_the_draft(three_dirs, mismatched, tmp_path, monkeypatch):
    _no_export(monkeypatch)
    with pytest.raises(VocabularyMismatchError,
                       match=r"\(target vs draft\): target .* 512 logits, draft .* 600"):
        export_pair(three_dirs["target"], mismatched["wide"], tmp_path / "out",
                    draft_draft=three_dirs["draft_draft"])
    assert list(tmp_path.iterdir()) == []


def test_a_missing_or_enclosing_draft_draft_is_refused_up_front(three_dirs, tmp_path,
                                                                monkeypatch):
    _no_export(monkeypatch)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_pair(three_dirs["target"], three_dirs["draft"], tmp_path / "out",
                    draft_draft=tmp_path / "missing")
    with pytest.raises(ExportError, match="holds the source model"):
        export_pair(three_dirs["target"], three_dirs["draft"], three_dirs["draft_draft"].parent,
                    draft_draft=three_dirs["draft_draft"], overwrite=True)
    assert list(tmp_path.iterdir()) == []


# -- nothing left behind when the third export fails ---------------------------------------


def _fail_on_draft_draft(monkeypatch, exc):
    """The real export step for target and draft; ``exc`` half way into draft_draft's."""
    real = api._export_into
    seen = []

    def export_then_fail(info, folder, **kw):
        seen.append((kw["label"], folder))
        if kw["label"] == "draft_draft":
            (folder / "model.onnx").write_bytes(b"half written")
            raise exc
        return real(info, folder, **kw)

    monkeypatch.setattr(api, "_export_into", export_then_fail)
    return seen


@pytest.mark.parametrize("exc", [RuntimeError("injected"), KeyboardInterrupt()])
def test_a_failed_third_export_leaves_nothing(three_dirs, tmp_path, monkeypatch, exc):
    seen = _fail_on_draft_draft(monkeypatch, exc)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        export_pair(three_dirs["target"], three_dirs["draft"], out, validate=False,
                    draft_draft=three_dirs["draft_draft"])
    assert [label for label, _ in seen] == ROLES
    assert seen[0][1].parent.parent == tmp_path  # the staging folder beside out
    assert list(tmp_path.iterdir()) == []


def test_a_failed_third_export_keeps_the_old_export(exported_three, three_dirs, tmp_path,
                                                    monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(exported_three[0], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _fail_on_draft_draft(monkeypatch, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        export_pair(three_dirs["target"], three_dirs["draft"], out, overwrite=True,
                    validate=False, draft_draft=three_dirs["draft_draft"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    # a pair export over a three-model export replaces it: draft_draft goes with it
    monkeypatch.undo()
    report = export_pair(three_dirs["target"], three_dirs["draft"], out, overwrite=True,
                         validate=False)
    assert report.draft_draft is None
    assert _files(out) == ["draft", output.MARKER_NAME, "target"]
    assert json.loads((out / output.MARKER_NAME).read_text())["roles"] == ["target", "draft"]


# -- static caches (onnxruntime-genai's builder) -------------------------------------------


@pytest.mark.slow  # the builder: about 20 s for the three on 2 cores
def test_static_export_of_three(three_dirs, tmp_path):
    from quickdraft.export.builder import builder_problem

    if builder_problem():
        pytest.skip(builder_problem())
    out = tmp_path / "static"
    report = export_pair(three_dirs["target"], three_dirs["draft"], out, kv_cache="static",
                         max_length=64, validate=False, draft_draft=three_dirs["draft_draft"])
    assert _files(out) == sorted([*ROLES, output.MARKER_NAME])
    assert _files(out / "draft_draft") == _files(out / "draft")
    assert "genai_config.json" in _files(out / "draft_draft")
    for role in ROLES:
        m = load_manifest(out / role)
        assert m.kv_cache == "static" and m.max_cache_length == 64, role
    assert report.draft_draft.manifest.hidden_size == 16
    marker = json.loads((out / output.MARKER_NAME).read_text())
    assert marker["roles"] == ROLES
    assert {r: v["kv_cache"] for r, v in marker["models"].items()} == dict.fromkeys(
        ROLES, "static")
    from quickdraft.ort_backend import load_pair

    pair = load_pair(out, device="cpu", max_gamma=3)
    assert pair.target.manifest.kv_cache == "static"
    dd = getattr(pair, "draft_draft", None)  # loaded where the runtime knows the folder
    if dd is not None:
        assert dd.manifest.kv_cache == "static" and dd.manifest.hidden_size == 16
