"""Every drafting strategy through the ONNX Runtime Generator, on both cache kinds: greedy
speculative output equals greedy autoregressive output, seeded sampling repeats, and a
folder with a draft of the draft runs the hierarchical drafter and the bandit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from quickdraft.drafters import DRAFTERS, BanditDrafter, HierarchicalDrafter  # noqa: E402
from quickdraft.ort_backend import DecodeConfig, load_pair  # noqa: E402
from quickdraft.ort_backend.cli import default_model_dir  # noqa: E402
from quickdraft.sampling import SamplingConfig  # noqa: E402

PROMPTS = ["def quicksort(arr):\n", "    return self.", "import os\nimport sys\n\n"]


def _with_draft_draft(src: Path, dst: Path) -> Path:
    """A copy of an exported pair whose draft also serves as the draft of the draft."""
    shutil.copytree(src, dst)
    shutil.copytree(src / "draft", dst / "draft_draft")
    return dst


@pytest.fixture(scope="module", params=["dynamic", "static"])
def folder(request, tmp_path_factory):
    if request.param == "dynamic":
        src = default_model_dir()
    else:
        src = request.getfixturevalue("static_llama_pair")
    return _with_draft_draft(src, tmp_path_factory.mktemp(request.param) / "pair")


@pytest.fixture(scope="module")
def pair(folder):
    return load_pair(folder, device="cpu", max_gamma=4)


@pytest.mark.parametrize("kind", DRAFTERS)
@pytest.mark.parametrize("gamma", [3, "auto"])
def test_greedy_output_equals_autoregressive(pair, kind, gamma):
    config = DecodeConfig(max_new_tokens=40)
    with pair.generator(config) as ar, pair.generator(config, gamma=gamma, drafter=kind) as sp:
        for prompt in PROMPTS:
            want = ar.generate(prompt)
            got = sp.generate(prompt)
            assert got.tokens == want.tokens
            assert got.stats.mode == "speculative" and got.stats.generation.iterations > 0


@pytest.mark.parametrize("kind", DRAFTERS)
def test_seeded_sampling_repeats(pair, kind):
    """A seed fixes the output of every drafter whose choices are deterministic; the
    bandit chooses by measured time, so its tokens (exact in law) may differ run to run."""
    config = DecodeConfig(max_new_tokens=24, sampling=SamplingConfig(temperature=0.8), seed=5)
    runs = []
    for _ in range(2):
        with pair.generator(config, gamma=3, drafter=kind) as gen:
            timed = isinstance(gen.drafter, BanditDrafter)
            runs.append(gen.generate(PROMPTS[0]).tokens)
    for tokens in runs:  # the full length, or a sampled end of sequence (the bandit's runs
        # take different paths, so one of them may draw EOS)
        assert len(tokens) == 24 or (tokens[-1] in pair.eos_ids and len(tokens) < 24)
    assert timed or runs[0] == runs[1]


def test_the_folder_with_a_draft_of_the_draft(pair):
    assert pair.draft_draft is not None
    sampling = SamplingConfig(temperature=0)
    assert isinstance(pair.drafter(sampling, 3, "hierarchical"), HierarchicalDrafter)
    auto = pair.drafter(sampling, 3, "auto")  # several drafters: the bandit picks
    assert isinstance(auto, BanditDrafter)
    assert set(auto.arms) == {"ngram+draft", "draft", "ngram", "hierarchical", "draft_draft"}
    # one cache per model, whatever the number of arms drafting with it
    assert len(auto.states) == 2
    assert auto.arms["draft"].states[0] is auto.arms["hierarchical"].states[0]
    with pair.generator(DecodeConfig(max_new_tokens=60), drafter=auto) as gen:
        gen.generate(PROMPTS[0])
    counts, _ = auto.stats.snapshot()  # every arm was tried, by this or an earlier sequence
    assert len(counts) == 5 and all(c > 0 for c in counts.values()) and auto.plays
    # the next sequence's bandit of the same configuration shares the measured rewards
    again = pair.drafter(sampling, 3, "auto")
    assert again.stats is auto.stats and again is not auto
    assert pair.drafter(sampling, 2, "auto").stats is not auto.stats
    with pytest.raises(ValueError, match="--drafter must be one of"):
        pair.drafter(sampling, 3, "magic")
    with pytest.raises(ValueError, match="--gamma must be"):
        pair.drafter(sampling, 0)
