"""The manifest as untrusted input: paths, field types, values and the context length."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from quickdraft.manifest import (
    MANIFEST_NAME,
    ModelFolderError,
    ModelManifest,
    load_manifest,
    onnx_external_locations,
)

DEFAULT = Path(__file__).resolve().parent.parent / "quickdraft" / "models" / "default" / "target"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One copy of the packaged target folder; tests hard-link its files into their own."""
    out = tmp_path_factory.mktemp("base") / "target"
    shutil.copytree(DEFAULT, out)
    return out


@pytest.fixture
def folder(base, tmp_path) -> Path:
    """A fresh model folder: the real export (model.onnx hard-linked from the module copy)."""
    out = tmp_path / "model"
    shutil.copytree(base, out, copy_function=os.link)
    (out / MANIFEST_NAME).unlink()  # edited below: a file of its own
    shutil.copy(base / MANIFEST_NAME, out / MANIFEST_NAME)
    (out / "config.json").unlink()
    shutil.copy(base / "config.json", out / "config.json")
    return out


def _edit(folder: Path, name: str = MANIFEST_NAME, **changes) -> None:
    path = folder / name
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _tiny_onnx(path: Path, location: str | None = None, data: Path | None = None) -> None:
    """A one-node ONNX model whose initializer lives in the external file ``location``."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    if location is not None:
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "8")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        if data is not None:
            data.write_bytes(b"\0" * 8)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [weight])
    onnx.save(helper.make_model(graph), str(path))


# -- the valid base ---------------------------------------------------------------------------


def test_the_real_export_loads(folder):
    m = load_manifest(folder)
    assert m.model_file == "model.onnx" and m.max_length == 512
    assert m.check_files(folder) == (folder / "model.onnx").resolve()
    assert m.model_path(folder) == (folder / "model.onnx").resolve()
    assert m.external_paths(folder) == []


# -- 1. paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../outside/evil.onnx", "/etc/passwd", "", "a/../model.onnx",
                                  "..\\evil.onnx", "C:\\evil.onnx"])
def test_model_file_that_is_not_a_plain_name(folder, name):
    _edit(folder, model_file=name)
    with pytest.raises(ModelFolderError, match="model_file .*not a plain relative path"):
        load_manifest(folder)
    m = load_manifest(DEFAULT)
    m.model_file = name  # a manifest made in code is checked again when its files are
    with pytest.raises(ModelFolderError, match="model_file"):
        m.check_files(folder)
    with pytest.raises(ModelFolderError, match="model_file"):
        m.model_path(folder)


@pytest.mark.parametrize("name", ["../weights.bin", "/tmp/weights.bin"])
def test_external_data_that_is_not_a_plain_name(folder, name):
    _edit(folder, external_data=["model.onnx_data", name])
    with pytest.raises(ModelFolderError, match="external_data .*not a plain relative path"):
        load_manifest(folder)


def test_missing_files_are_listed(folder):
    _edit(folder, external_data=["model.onnx_data"])
    m = load_manifest(folder)
    with pytest.raises(FileNotFoundError, match="incomplete: model.onnx_data missing"):
        m.check_files(folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="model.onnx, model.onnx_data missing"):
        m.check_files(folder)


def test_symlink_pointing_outside_is_refused(folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = outside / "evil.onnx"
    shutil.copy(folder / "model.onnx", evil)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(evil)
    m = load_manifest(folder)
    with pytest.raises(ModelFolderError, match=f"model_file 'model.onnx' resolves to {evil}, "
                                                "outside the model folder"):
        m.check_files(folder)
    # the same through a linked folder and for external data
    (folder / "model.onnx").unlink()
    shutil.copy(evil, folder / "model.onnx")
    (outside / "model.onnx_data").write_bytes(b"0")
    (folder / "sub").symlink_to(outside)
    m.external_data = ["sub/model.onnx_data"]
    with pytest.raises(ModelFolderError, match="external_data 'sub/model.onnx_data' resolves"):
        m.check_files(folder)
    with pytest.raises(ModelFolderError, match="external_data"):
        m.external_paths(folder)


def test_symlink_inside_is_accepted(folder):
    (folder / "weights").mkdir()
    (folder / "model.onnx").rename(folder / "weights" / "real.onnx")
    (folder / "model.onnx").symlink_to(Path("weights") / "real.onnx")
    (folder / "weights" / "model.onnx_data").write_bytes(b"0")
    (folder / "data").symlink_to("weights")
    _edit(folder, external_data=["data/model.onnx_data"])
    m = load_manifest(folder)
    assert m.check_files(folder) == (folder / "weights" / "real.onnx").resolve()
    assert m.external_paths(folder) == [(folder / "weights" / "model.onnx_data").resolve()]


def test_a_folder_linked_as_a_whole_is_accepted(folder, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(folder)
    assert load_manifest(link).check_files(link) == (folder / "model.onnx").resolve()


def test_model_file_that_is_not_a_regular_file(folder):
    (folder / "graph").mkdir()
    _edit(folder, model_file="graph")
    with pytest.raises(ModelFolderError, match="model_file 'graph' is not a regular file"):
        load_manifest(folder).check_files(folder)


def test_onnx_external_data_outside_the_folder_is_refused(folder, tmp_path):
    (folder / "model.onnx").unlink()
    _tiny_onnx(folder / "model.onnx", "../secret.bin", tmp_path / "secret.bin")
    assert onnx_external_locations(folder / "model.onnx") == ["../secret.bin"]
    m = load_manifest(folder)  # the manifest itself names no external data
    with pytest.raises(ModelFolderError, match="external data of model.onnx '../secret.bin'"):
        m.check_files(folder)
    _tiny_onnx(folder / "model.onnx", str(tmp_path / "secret.bin"))
    with pytest.raises(ModelFolderError, match="not a plain relative path"):
        m.check_files(folder)


def test_onnx_external_data_through_a_symlink_outside_is_refused(folder, tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 8)
    (folder / "weights.bin").symlink_to(tmp_path / "secret.bin")
    (folder / "model.onnx").unlink()
    _tiny_onnx(folder / "model.onnx", "weights.bin")
    with pytest.raises(ModelFolderError, match="'weights.bin' resolves to .*outside"):
        load_manifest(folder).check_files(folder)


def test_onnx_external_data_is_relative_to_the_model_file(folder):
    (folder / "model.onnx").unlink()
    (folder / "onnx").mkdir()
    _tiny_onnx(folder / "onnx" / "model.onnx", "weights.bin", folder / "onnx" / "weights.bin")
    _edit(folder, model_file="onnx/model.onnx", external_data=["onnx/weights.bin"])
    m = load_manifest(folder)
    assert m.check_files(folder) == (folder / "onnx" / "model.onnx").resolve()
    (folder / "onnx" / "weights.bin").unlink()
    (folder / "weights.bin").write_bytes(b"\0" * 8)  # next to the folder, not the model
    m.external_data = []
    with pytest.raises(FileNotFoundError, match="weights.bin missing"):
        m.check_files(folder)


def test_onnx_external_data_inside_the_folder_runs(folder):
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    (folder / "model.onnx").unlink()
    _tiny_onnx(folder / "model.onnx", "weights.bin", folder / "weights.bin")
    path = load_manifest(folder).check_files(folder)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones(2, np.float32)})
    assert y.tolist() == [1.0, 1.0]


def test_an_unreadable_graph_is_left_to_onnx_runtime(folder):
    (folder / "model.onnx").write_bytes(b"not a model")
    assert onnx_external_locations(folder / "model.onnx") == []
    assert load_manifest(folder).check_files(folder) == (folder / "model.onnx").resolve()


# -- 2. types ---------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"num_layers": "4"}, 'num_layers is "4" \\(a string\\), expected an integer'),
    ({"num_layers": True}, "num_layers is true \\(a boolean\\), expected an integer"),
    ({"input_names": "x"}, 'input_names is "x" \\(a string\\), expected a list of strings'),
    ({"output_names": ["logits", 1]}, "output_names .* expected a list of strings"),
    ({"has_position_ids": "yes"}, "has_position_ids is \"yes\" .*expected true or false"),
    ({"has_attention_mask": 1}, "has_attention_mask is 1 \\(an integer\\), expected true"),
    ({"max_length": 1e9}, "max_length is 1000000000.0 \\(a number\\), expected an integer"),
    ({"eos_token_id": "0"}, "eos_token_id .* expected an integer or null"),
    ({"eos_token_ids": [0, "1"]}, "eos_token_ids .* expected a list of integers"),
    ({"versions": {"onnx": 1}}, "versions .* expected an object of strings"),
    ({"validation": []}, "validation is \\[\\] \\(a list\\), expected an object"),
    ({"dtype": None}, "dtype is null \\(null\\), expected a string"),
    ({"vocab_size": -1}, "vocab_size is -1, expected an integer >= 1"),
    ({"num_kv_heads": 0}, "num_kv_heads is 0, expected an integer >= 1"),
    ({"bos_token_id": -2}, "bos_token_id is -2, expected an integer >= 0"),
    ({"eos_token_ids": [-1]}, "eos_token_ids \\[-1\\] has a negative id"),
    ({"past_key_template": "past.{j}"}, "past_key_template 'past.{j}' is not a name with one"),
    ({"present_value_template": "present"}, "present_value_template 'present' is not"),
])
def test_fields_of_the_wrong_type_or_range(folder, changes, message):
    _edit(folder, **changes)
    with pytest.raises(ModelFolderError, match=message) as info:
        load_manifest(folder)
    assert "re-export" in str(info.value)


def test_every_wrong_field_is_named_at_once(folder):
    _edit(folder, num_layers="4", input_names="x")
    with pytest.raises(ModelFolderError, match="num_layers is .*; input_names is"):
        load_manifest(folder)


@pytest.mark.parametrize("version", ["2", 2.0, True])
def test_manifest_version_of_the_wrong_type(folder, version):
    _edit(folder, manifest_version=version)
    with pytest.raises(ModelFolderError, match="manifest_version is .* expected an integer") as e:
        load_manifest(folder)
    assert "reads 1 and 2" not in str(e.value)


def test_unreadable_version_and_foreign_json(folder):
    _edit(folder, manifest_version=3)
    with pytest.raises(ModelFolderError, match="has manifest_version 3, .*reads 1 and 2"):
        load_manifest(folder)
    (folder / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ModelFolderError, match="not a JSON object"):
        load_manifest(folder)
    (folder / MANIFEST_NAME).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(folder)


def test_the_error_class_can_be_chosen(folder):
    class Custom(ModelFolderError):
        pass

    _edit(folder, num_layers="4")
    with pytest.raises(Custom):
        load_manifest(folder, error=Custom)


# -- 3. max_length against config.json -------------------------------------------------------


def test_max_length_beyond_the_config_context(folder):
    _edit(folder, max_length=4096, max_cache_length=4096)
    with pytest.raises(ModelFolderError,
                       match="max_length 4096 is larger than the model's context, "
                             "max_position_embeddings 512"):
        load_manifest(folder)
    (folder / "config.json").unlink()  # nothing to check against
    assert load_manifest(folder).max_length == 4096


@pytest.mark.parametrize("key", ["n_positions", "n_ctx"])
def test_max_length_against_a_gpt2_style_config(folder, key):
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", key: 256}))
    with pytest.raises(ModelFolderError, match=f"max_length 512 .*{key} 256"):
        load_manifest(folder)
    _edit(folder, "config.json", **{key: 1024})
    assert load_manifest(folder).max_length == 512


def test_max_cache_length_beyond_max_length(folder):
    _edit(folder, max_cache_length=1024)
    with pytest.raises(ModelFolderError,
                       match="max_cache_length 1024 is larger than max_length 512"):
        load_manifest(folder)
    _edit(folder, max_cache_length=0)  # 0: the whole context
    assert load_manifest(folder).max_cache_length == 512


def test_a_broken_config_is_refused(folder):
    (folder / "config.json").write_text("{")
    with pytest.raises(ModelFolderError, match="config.json is not valid JSON"):
        load_manifest(folder)


# -- 4. values --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, value, allowed", [
    ("kv_cache", "paged", "'dynamic', 'static'"),
    ("dtype", "int8", "'fp32', 'fp16', 'bf16'"),
    ("kv_layout", "bshd", "'bnsh'"),
    ("execution_provider", "tpu", "'', 'cpu', 'cuda'"),
])
def test_unknown_values_list_the_allowed_ones(folder, name, value, allowed):
    _edit(folder, **{name: value})
    with pytest.raises(ModelFolderError, match=f"{name} is '{value}', expected one of {allowed}"):
        load_manifest(folder)


def test_manifests_built_in_code_still_save_and_load(folder):
    m = load_manifest(folder)
    m.validation = {"note": "saved again"}
    m.save(folder)
    assert load_manifest(folder) == m
    assert isinstance(m, ModelManifest)


@pytest.mark.parametrize("name", ["quickdraft.json", "config.json", "tokenizer.json"])
def test_fixed_name_files_linked_outside_are_refused(tmp_path, name):
    """The files read at fixed names must resolve inside the folder too."""
    import shutil

    from quickdraft.ort_backend.text import load_tokenizer

    src = Path(__file__).resolve().parent.parent / "quickdraft" / "models" / "default" / "target"
    folder = tmp_path / "model"
    shutil.copytree(src, folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / name).rename(outside / name)
    (folder / name).symlink_to(outside / name)
    with pytest.raises(ValueError, match="outside the model folder"):
        if name == "tokenizer.json":
            load_tokenizer(folder)
        else:
            load_manifest(folder)
