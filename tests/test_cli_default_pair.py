"""`quickdraft generate` with no model arguments runs the bundled pair on the CPU and
compares speculative with autoregressive decoding."""

from __future__ import annotations

import json

from quickdraft.cli import main
from quickdraft.ort_backend.cli import default_model_dir


def test_default_model_dir_is_the_bundled_pair():
    folder = default_model_dir()
    assert (folder / "target" / "quickdraft.json").is_file()
    assert (folder / "draft" / "quickdraft.json").is_file()


def test_generate_without_model_dir_reports_acceptance_and_speedup(capsys):
    assert main(["generate", "--prompt", "def quicksort(arr):", "--max-new-tokens", "24",
                 "--gamma", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # the completion
    assert "acceptance rate" in captured.err
    assert "speedup over autoregressive decoding" in captured.err
    assert "same tokens" in captured.err  # greedy: both modes give the target's tokens


def test_generate_json_carries_the_comparison(capsys):
    assert main(["generate", "--prompt", "import os\n", "--max-new-tokens", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["stats"]["gamma"] == 4  # the bundled pair's default draft length
    comparison = result["comparison"]
    assert comparison["same_tokens"] is True
    assert comparison["speedup"] > 0 and 0 <= comparison["acceptance_rate"] <= 1


def test_autoregressive_flag_gives_the_speculative_tokens(capsys):
    """--autoregressive loads the target alone (no comparison); greedy: the same tokens."""
    args = ["generate", "--prompt", "import os\n", "--max-new-tokens", "16", "--json"]
    assert main([*args, "--gamma", "3"]) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--autoregressive"]) == 0
    auto = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert spec["stats"]["mode"] == "speculative" and spec["stats"]["gamma"] == 3
    assert auto["stats"]["mode"] == "autoregressive" and "comparison" not in auto
    assert auto["tokens"] == spec["tokens"] and len(auto["tokens"]) == 16


def test_pipelined_flag_gives_the_speculative_tokens_and_refuses_what_it_cannot_run(capsys):
    args = ["generate", "--prompt", "def quicksort(arr):", "--max-new-tokens", "24", "--json"]
    assert main([*args, "--gamma", "3"]) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--gamma", "3", "--pipelined"]) == 0
    piped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert piped["stats"]["mode"] == "pipelined" and piped["tokens"] == spec["tokens"]
    pipe = piped["stats"]["pipeline"]
    assert pipe["shadow_draft_calls"] > 0 and pipe["iterations"] == piped["stats"]["iterations"]
    assert main([*args, "--gamma", "3", "--pipelined", "--temperature", "0.7"]) == 0
    sampled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sampled["stats"]["mode"] == "pipelined" and sampled["stats"]["verifier"] == "device"
    assert len(sampled["tokens"]) == 24
    # continuations only while every candidate keeps being kept: still the same tokens
    assert main([*args, "--gamma", "3", "--pipelined", "--min-keep-rate", "1"]) == 0
    ruled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ruled["tokens"] == spec["tokens"]
    assert ruled["stats"]["pipeline"]["shadow_draft_calls"] < pipe["shadow_draft_calls"]
    for extra, why in ((["--temperature", "0.7", "--host-verify"], "verify must be 'device'"),
                       (["--drafter", "ngram"], "drafter"), (["--gamma", "auto"], "fixed gamma"),
                       (["--min-keep-rate", "2"], "--min-keep-rate must be in [0, 1]")):
        assert main([*args, "--pipelined", *extra]) != 0
        assert why in capsys.readouterr().err
    assert main([*args, "--min-keep-rate", "0.5"]) != 0
    assert "add --pipelined" in capsys.readouterr().err


def test_conflicting_flags_are_refused_before_any_model_loads(tmp_path, capsys):
    """Flag conflicts name the flags even when the model folder does not exist: they are
    checked before loading (a 7B load would otherwise finish first)."""
    missing = str(tmp_path / "no-such-pair")
    for extra, why in ((["--pipelined", "--autoregressive"], "--pipelined drafts with"),
                       (["--min-keep-rate", "0.5"], "add --pipelined"),
                       (["--pipelined", "--min-keep-rate", "2"], "--min-keep-rate must be")):
        assert main(["generate", "--model-dir", missing, "--prompt", "x", *extra]) != 0
        err = capsys.readouterr().err
        assert why in err and "no-such-pair" not in err
