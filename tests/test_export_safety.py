"""Export safety: what --out may be, what --overwrite may replace, cleanup after SIGINT and
SIGTERM (real signals to a real process), stale staging folders, unwritable parents and the
static export's head-size check. The export step is replaced by a fake one, so nothing here
loads torch or a model; each test takes well under a few seconds."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import quickdraft.export.api as api
from quickdraft.cli import main as cli_main
from quickdraft.export import ExportError, builder, checks, export_model, export_pair, output
from quickdraft.export.common import CACHE_TEMPLATES
from quickdraft.manifest import ModelManifest

CONFIG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
          "max_position_embeddings": 256}


def _manifest(kv_cache: str = "dynamic") -> ModelManifest:
    return ModelManifest(
        architecture="llama", num_layers=1, num_attention_heads=4, num_kv_heads=2,
        head_dim=16, hidden_size=64, vocab_size=512, max_length=256, dtype="fp32",
        kv_layout="bnsh", kv_cache=kv_cache, model_file="model.onnx",
        input_names=["input_ids", "past_key_values.0.key", "past_key_values.0.value"],
        output_names=["logits", "present.0.key", "present.0.value"],
        has_position_ids=False, has_attention_mask=False, **CACHE_TEMPLATES)


def _fake_info(source) -> checks.SourceInfo:
    folder = Path(os.fspath(source))
    return checks.SourceInfo(str(source), folder, True, SimpleNamespace(model_type="llama"))


def _fake_export_into(info, folder, **kw):
    (folder / "model.onnx").write_bytes(b"not really a graph")
    _manifest().save(folder)
    return _manifest()


@pytest.fixture
def fake(monkeypatch):
    """The source checks and the optimum-onnx step replaced by light fakes; ``calls``
    counts the source checks (0 means a refusal came before any heavy work)."""
    calls = []

    def check_pair(t, d):
        calls.append((t, d))
        return _fake_info(t), _fake_info(d)

    def check_model(src):
        calls.append(src)
        return _fake_info(src)

    monkeypatch.setattr(checks, "check_pair", check_pair)
    monkeypatch.setattr(checks, "check_model", check_model)
    monkeypatch.setattr(api, "_export_into", _fake_export_into)
    return calls


@pytest.fixture
def sources(tmp_path):
    """Two local model folders (config.json only) under tmp_path/src."""
    dirs = {}
    for role in ("target", "draft"):
        dirs[role] = tmp_path / "src" / role
        dirs[role].mkdir(parents=True)
        (dirs[role] / "config.json").write_text(json.dumps(CONFIG))
    return dirs


# -- what --out may be ---------------------------------------------------------------------


def test_a_plain_export_writes_the_marker(fake, sources, tmp_path):
    report = export_pair(sources["target"], sources["draft"], tmp_path / "out")
    marker = json.loads((tmp_path / "out" / output.MARKER_NAME).read_text())
    assert marker["format"] == "quickdraft-export" and marker["layout"] == "pair"
    assert set(marker["models"]) == {"target", "draft"}
    assert marker["roles"] == ["target", "draft"] and report.draft_draft is None
    assert output.is_export(report.out)
    one = export_model(sources["draft"], tmp_path / "one")
    assert output.is_export(one.path) and (one.path / output.MARKER_NAME).is_file()


@pytest.mark.parametrize("out, match", [
    ("", "--out is empty"),
    ("   ", "--out is empty"),
    (".", "is the current directory"),
    ("..", "a parent of the current directory"),
    ("/", "root folder"),
])
def test_dangerous_out_is_refused(fake, sources, tmp_path, monkeypatch, out, match):
    monkeypatch.chdir(sources["target"])
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=match):
            export_pair(sources["target"], sources["draft"], out, overwrite=overwrite)
    assert fake == []  # refused before the sources were even loaded
    assert sorted(p.name for p in sources["target"].iterdir()) == ["config.json"]


def test_home_and_source_folders_are_refused(fake, sources, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for out in (home, tmp_path):  # the home folder, and a folder above it
        with pytest.raises(ExportError, match="home folder"):
            export_pair(sources["target"], sources["draft"], out, overwrite=True)
    for out in (sources["draft"], sources["draft"].parent):  # a source, or above one
        with pytest.raises(ExportError, match="holds the source model"):
            export_pair(sources["target"], sources["draft"], out, overwrite=True)
        with pytest.raises(ExportError, match="holds the source model"):
            export_model(sources["draft"], out, overwrite=True)
    assert fake == []


def test_only_a_previous_export_is_overwritten(fake, sources, tmp_path):
    t, d = sources["target"], sources["draft"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="not a quickdraft export.*--overwrite"):
            export_pair(t, d, mine, overwrite=overwrite)
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_pair(t, d, tmp_path / "afile", overwrite=True)
    (tmp_path / "empty").mkdir()
    export_pair(t, d, tmp_path / "empty")  # an empty folder is fine

    out = tmp_path / "out"
    export_pair(t, d, out)
    with pytest.raises(ExportError, match="already exists.*add --overwrite"):
        export_pair(t, d, out)
    (out / "extra.txt").write_text("inside the old export")
    export_pair(t, d, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["draft", output.MARKER_NAME, "target"]

    # exports written before the marker: recognised by a manifest
    for old in ("old-pair", "old-model"):
        folder = tmp_path / old / ("target" if old == "old-pair" else "")
        folder.mkdir(parents=True)
        (folder / "quickdraft.json").write_text("{}")
        export_pair(t, d, tmp_path / old, overwrite=True)
        assert (tmp_path / old / output.MARKER_NAME).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unwritable_parent_is_refused_up_front(fake, sources, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if Path(p) == parent else real_access(p, mode, **kw)))
    for out in (parent / "out", parent / "deeper" / "out"):
        with pytest.raises(ExportError, match=f"cannot write to {parent} .*permission"):
            export_pair(sources["target"], sources["draft"], out)
    assert fake == []
    rc = cli_main(["export", "--target", str(sources["target"]), "--draft",
                   str(sources["draft"]), "--out", str(parent / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and str(parent) in err
    assert "folder you can write to" in err
    assert list(parent.iterdir()) == []


def _without_dac_override(parent) -> list[str]:
    """The command prefix that runs a child without CAP_DAC_OVERRIDE (dropped from the
    bounding and inheritable sets, so root's exec cannot regain it), after checking that
    such a child really cannot write into ``parent``; a skip, with the reason, where this
    machine cannot make one."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv: a folder's mode does "
                    "not bind root, and nothing here can drop CAP_DAC_OVERRIDE")
    prefix = [setpriv, "--bounding-set=-dac_override", "--inh-caps=-dac_override"]
    probe = ("import sys\ntry:\n    open(sys.argv[1], 'w')\nexcept PermissionError:\n"
             "    sys.exit(0)\nsys.exit(5)\n")
    done = subprocess.run([*prefix, sys.executable, "-c", probe, str(parent / "probe")],
                          capture_output=True, text=True, timeout=60)
    if done.returncode == 5:
        (parent / "probe").unlink()
        pytest.skip("a child without CAP_DAC_OVERRIDE still wrote into a mode-555 folder "
                    "(another capability, or a file system that ignores modes)")
    if done.returncode != 0:
        pytest.skip(f"setpriv could not drop CAP_DAC_OVERRIDE here: "
                    f"{(done.stderr or done.stdout).strip()[-300:]}")
    return prefix


def test_read_only_parent_for_real(fake, sources, tmp_path):
    """A folder whose mode (555) really refuses writes. Root writes into it regardless, so
    as root the export runs in a child process without the capability that overrides
    file modes (util-linux's setpriv drops CAP_DAC_OVERRIDE), where the mode binds."""
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.geteuid() != 0:
            with pytest.raises(ExportError, match="cannot write to"):
                export_pair(sources["target"], sources["draft"], parent / "out")
            return
        drop = _without_dac_override(parent)
        code = textwrap.dedent(f"""
            import sys
            from quickdraft.export import ExportError, export_pair
            try:
                export_pair({str(sources["target"])!r}, {str(sources["draft"])!r},
                            {str(parent / "out")!r})
            except ExportError as e:
                print(e)
                sys.exit(3)
            """)
        done = subprocess.run([*drop, sys.executable, "-c", code], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 3, done.stdout + done.stderr
        assert f"cannot write to {parent}" in done.stdout
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


# -- staging folders -----------------------------------------------------------------------


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_stale_staging_folders_of_dead_exports_are_removed(fake, sources, tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-abc_1234"
    alive = tmp_path / f".out.partial-{os.getpid()}-zzzzzzzz"  # a running export's
    kept = [alive,
            tmp_path / f".out.partial-{dead}-short",  # not mkdtemp's suffix
            tmp_path / f".other.partial-{dead}-abcdefgh",  # another --out's
            tmp_path / ".out.partial-abcdefgh",  # an older naming: no pid
            tmp_path / f".out.old-{dead}-123"]  # a replaced export: never touched
    for folder in (stale, *kept):
        folder.mkdir()
        (folder / "model.onnx").write_text("half")
    export_pair(sources["target"], sources["draft"], tmp_path / "out")
    assert not stale.exists()
    assert all(folder.is_dir() for folder in kept)
    assert output.remove_stale_partials(tmp_path / "out") == []


def test_sigterm_handler_is_restored(fake, sources, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def export_into(info, folder, **kw):
        seen.append(signal.getsignal(signal.SIGTERM))
        return _fake_export_into(info, folder)

    monkeypatch.setattr(api, "_export_into", export_into)
    export_pair(sources["target"], sources["draft"], tmp_path / "out")
    assert seen and seen[0] is not before and callable(seen[0])
    assert signal.getsignal(signal.SIGTERM) is before


DRIVER = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from types import SimpleNamespace

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    import quickdraft.export.api as api
    from quickdraft.cli import main
    from quickdraft.export import checks

    def check_pair(t, d):
        return tuple(checks.SourceInfo(s, Path(s), True, SimpleNamespace(model_type="llama"))
                     for s in (t, d))

    def slow_export_into(info, folder, **kw):
        (folder / "model.onnx").write_bytes(b"half written")
        print("READY", folder, flush=True)
        time.sleep(60)

    checks.check_pair = check_pair
    api._export_into = slow_export_into
    sys.exit(main(sys.argv[1:]))
""")


def _wait_for_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the export never started: {proc.communicate()}")


@pytest.mark.parametrize("signum, rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("existing", [False, True])
def test_a_signal_during_export_cleans_up(sources, tmp_path, signum, rc, existing):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    if existing:  # a previous export, being overwritten
        (out / "target").mkdir(parents=True)
        (out / "target" / "quickdraft.json").write_text("{}")
    argv = [sys.executable, str(driver), "export", "--target", str(sources["target"]),
            "--draft", str(sources["draft"]), "--out", str(out), "--overwrite"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    line = _wait_for_line(proc, timeout=60)
    staging = Path(line.split(maxsplit=1)[1].strip()).parent
    assert staging.name.startswith(f".out.partial-{proc.pid}-") and staging.is_dir()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == rc, stderr
    assert "Traceback" not in stderr
    lines = [s for s in stderr.splitlines() if not s.startswith("[")]  # progress lines
    assert len(lines) == 1 and "interrupted" in lines[0] and str(out) in lines[0], stderr
    assert not staging.exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["driver.py", "out", "src"] if existing else ["driver.py", "src"])
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["target"]


# -- the static export's head size ---------------------------------------------------------


def test_gqa_head_size_rule():
    assert builder.gqa_head_size_multiple("cpu") == 16
    assert builder.gqa_head_size_multiple("cuda") == 1
    assert builder._head_size({"hidden_size": 96, "num_attention_heads": 4}) == 24
    assert builder._head_size({"hidden_size": 96, "num_attention_heads": 4, "head_dim": 32}) == 32


@pytest.mark.parametrize("head_size", [16, 24, 40, 64])
def test_the_rule_matches_onnxruntime_on_the_cpu(head_size):
    """The rule is what this onnxruntime does: GroupQueryAttention with the fused rotary
    embedding (as in the builder's graphs) on the CPU, at ``head_size``."""
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    h, f32 = head_size, TensorProto.FLOAT
    specs = [("q", f32, [1, None, 2 * h]), ("k", f32, [1, None, h]), ("v", f32, [1, None, h]),
             ("pk", f32, [1, 1, None, h]), ("pv", f32, [1, 1, None, h]),
             ("sl", TensorProto.INT32, [1]), ("tl", TensorProto.INT32, []),
             ("cos", f32, [None, h // 2]), ("sin", f32, [None, h // 2])]
    node = helper.make_node("GroupQueryAttention", [s[0] for s in specs], ["o", "ok", "ov"],
                            domain="com.microsoft", num_heads=2, kv_num_heads=1, do_rotary=1)
    graph = helper.make_graph([node], "gqa", [helper.make_tensor_value_info(*s) for s in specs],
                              [helper.make_tensor_value_info(n, f32, None)
                               for n in ("o", "ok", "ov")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"q": rng.standard_normal((1, 3, 2 * h), np.float32),
            "k": rng.standard_normal((1, 3, h), np.float32),
            "v": rng.standard_normal((1, 3, h), np.float32),
            "pk": np.zeros((1, 1, 8, h), np.float32), "pv": np.zeros((1, 1, 8, h), np.float32),
            "sl": np.array([7], np.int32), "tl": np.array(8, np.int32),
            "cos": np.ones((16, h // 2), np.float32), "sin": np.zeros((16, h // 2), np.float32)}
    try:
        session.run(None, feed)
        runs = True
    except Exception as e:  # ORT's own exception types
        assert "head_size" in str(e)
        runs = False
    assert runs == (head_size % builder.gqa_head_size_multiple("cpu") == 0), ort.__version__
    del onnx


def test_static_export_refuses_the_head_size_up_front(fake, sources, tmp_path, capsys):
    config = dict(CONFIG, hidden_size=96)  # 4 heads of 24
    (sources["draft"] / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ExportError, match=r"head size 24 is not a multiple of 16.*"
                                          r"--kv-cache dynamic"):
        export_pair(sources["target"], sources["draft"], tmp_path / "out", kv_cache="static")
    assert fake == []  # before the sources were loaded (no transformers, no weights)
    rc = cli_main(["export", "--target", str(sources["target"]), "--draft",
                   str(sources["draft"]), "--out", str(tmp_path / "out"), "--kv-cache",
                   "static"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "head size 24" in err
    assert time.perf_counter() - start < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # head_dim set in the config wins over hidden_size / heads; the CUDA kernel has no limit
    (sources["draft"] / "config.json").write_text(json.dumps(dict(config, head_dim=32)))
    builder.check_head_sizes([sources["target"], sources["draft"]], "cpu")
    (sources["draft"] / "config.json").write_text(json.dumps(config))
    builder.check_head_sizes([sources["target"], sources["draft"]], "cuda")


# -- sources checked before any heavy work ---------------------------------------------------


def _folder(tmp_path, name: str, **config) -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**CONFIG, **config}))
    return folder


@pytest.mark.parametrize("field, value", [("num_hidden_layers", "2"), ("vocab_size", 0),
                                          ("hidden_size", True), ("n_embd", 1.5),
                                          ("intermediate_size", -3)])
def test_malformed_config_values_are_refused_naming_the_file_and_field(tmp_path, field,
                                                                       value):
    folder = _folder(tmp_path, "m", **{field: value})
    with pytest.raises(checks.UnsupportedModelError) as err:
        checks.check_model(folder)
    assert str(folder / "config.json") in str(err.value) and f"sets {field} to" in str(err.value)


def test_heads_that_key_value_groups_do_not_divide_are_refused(tmp_path):
    folder = _folder(tmp_path, "gqa", num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(checks.UnsupportedModelError, match="num_key_value_heads 3 does not"):
        checks.check_model(folder)


def _safetensors(path: Path) -> int:
    """A valid two-tensor safetensors file at ``path``; its size in bytes."""
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    save_file({"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.float32)}, str(path))
    return path.stat().st_size


def test_weight_files_that_cannot_be_read_whole_are_refused_naming_them(tmp_path):
    folder = _folder(tmp_path, "w")
    size = _safetensors(folder / "model.safetensors")
    checks.check_weights(folder, "w")  # whole: nothing to say
    whole = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(whole[: size - 10])  # a truncated copy
    with pytest.raises(checks.UnsupportedModelError,
                       match=r"model\.safetensors holds 76 bytes of tensors by its header, "
                             r"but only 66 follow"):
        checks.check_model(folder)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(checks.UnsupportedModelError, match="not a safetensors table"):
        checks.check_weights(folder, "w")
    (folder / "model.safetensors").write_bytes(whole)
    index = {"weight_map": {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "adapter_model.safetensors").write_bytes(b"not weights transformers loads")
    checks.check_weights(folder, "w")  # the single file is what transformers loads
    (folder / "model.safetensors").rename(folder / "model-00001.safetensors")
    with pytest.raises(checks.UnsupportedModelError,
                       match="names shards the folder does not hold: model-00002.safetensors"):
        checks.check_weights(folder, "w")
    (folder / "model-00002.safetensors").write_bytes(whole[:20])
    with pytest.raises(checks.UnsupportedModelError, match="model-00002.safetensors declares"):
        checks.check_weights(folder, "w")
    (folder / "model-00002.safetensors").write_bytes(
        b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 76\n")
    with pytest.raises(checks.UnsupportedModelError, match="git-lfs pointer.*git lfs pull"):
        checks.check_weights(folder, "w")
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(checks.UnsupportedModelError, match="neither a zip archive"):
        checks.check_weights(folder, "w")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02 a legacy pickle")
    checks.check_weights(folder, "w")


def test_a_corrupt_draft_is_refused_before_the_target_is_exported(tmp_path, monkeypatch):
    exported = []
    monkeypatch.setattr(api, "_export_into", lambda info, folder, **kw: exported.append(info))
    target, draft = _folder(tmp_path, "target"), _folder(tmp_path, "draft")
    _safetensors(target / "model.safetensors")
    size = _safetensors(draft / "model.safetensors")
    with open(draft / "model.safetensors", "r+b") as fh:
        fh.truncate(size - 1)
    with pytest.raises(checks.UnsupportedModelError, match="draft: .*model.safetensors holds"):
        export_pair(target, draft, tmp_path / "out")
    assert exported == [] and not (tmp_path / "out").exists()


def test_the_other_sources_are_checked_before_a_gguf_file_is_converted(tmp_path, monkeypatch):
    from quickdraft.export import gguf

    def convert(*args, **kwargs):
        raise AssertionError("a GGUF file was converted before the draft was checked")

    monkeypatch.setattr(gguf, "converted_sources", convert)
    (tmp_path / "target.gguf").write_bytes(b"GGUF not converted here")
    draft = _folder(tmp_path, "draft", num_hidden_layers="two")
    with pytest.raises(checks.UnsupportedModelError, match="sets num_hidden_layers to 'two'"):
        export_pair(tmp_path / "target.gguf", draft, tmp_path / "out")


def test_a_failed_export_removes_the_new_parent_folders_it_made(fake, sources, tmp_path,
                                                                monkeypatch):
    def fail(info, folder, **kw):
        raise ExportError(f"{info.source}: fails on purpose")

    monkeypatch.setattr(api, "_export_into", fail)
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "deeper" / "out", tmp_path / "kept" / "new" / "out"):
        with pytest.raises(ExportError, match="fails on purpose"):
            export_pair(sources["target"], sources["draft"], out)
        with pytest.raises(ExportError, match="fails on purpose"):
            export_model(sources["draft"], out)
    assert not (tmp_path / "new").exists() and not (tmp_path / "kept" / "new").exists()
    assert (tmp_path / "kept").is_dir()
    (tmp_path / "kept" / "new").mkdir()
    (tmp_path / "kept" / "new" / "other.txt").write_text("not the export's")
    with pytest.raises(ExportError, match="fails on purpose"):
        export_pair(sources["target"], sources["draft"], tmp_path / "kept" / "new" / "o" / "out")
    assert (tmp_path / "kept" / "new" / "other.txt").is_file()
    assert not (tmp_path / "kept" / "new" / "o").exists()
