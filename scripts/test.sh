#!/usr/bin/env bash
# Install quickdraft with everything its tests need into .venv, then run the tests: ruff, the
# whole suite, and (without arguments) the ONNX Runtime tests a second time against the
# lowest supported onnxruntime. Arguments go to the first pytest run and skip the second.
set -euo pipefail
cd "$(dirname "$0")/.."
# the lowest onnxruntime that pyproject.toml allows (onnxruntime>=1.31,<1.33)
ORT_LOWEST=1.31.0
python3 -m venv .venv
. .venv/bin/activate
# byte-compiled at install: this machine sets PYTHONDONTWRITEBYTECODE, so a module left
# uncompiled is compiled again by every process that imports it
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0        # CPU build; install before anything that needs torch
python -m pip install -q -e ".[test,export,ort,docs,bench,serve]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$(mktemp -d)}"
# one OpenMP thread per pytest worker: two workers' torch thread pools on two cores wait on
# each other at every barrier (a 3 s training test took 80 s beside the other worker)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
# some test fixtures (the tokenizer, the random Hugging Face models, the model builder's
# graphs) are built once, in a folder new to each invocation, for both pytest runs: the
# second run tests the lowest onnxruntime on graphs the builder made with the newest one
# (it imports onnxruntime.quantization), the graphs a user of either version can get
shared="$(mktemp -d)"
lowest="$(mktemp -d)"
trap 'rm -rf "$shared" "$lowest"' EXIT
export QUICKDRAFT_TEST_SHARED="$shared"
ruff check quickdraft tests benchmarks scripts
# two workers (pytest-xdist), each taking whole files: a file's fixtures are built once
python -m pytest -q -p no:cacheprovider --hypothesis-profile=ci -n 2 --dist loadfile "$@"
if [ "$#" -gt 0 ]; then
    exit 0
fi

# The lowest onnxruntime shadows the installed one through PYTHONPATH (its dependencies are
# the installed ones' too): one wheel, no second environment. Child processes (the model
# builder) inherit PYTHONPATH, so they see the same onnxruntime.
python -m pip install -q --no-deps --target "$lowest" "onnxruntime==$ORT_LOWEST"
PYTHONPATH="$lowest" python -c "import onnxruntime, sys; v = onnxruntime.__version__; \
sys.exit(0 if v == '$ORT_LOWEST' else f'expected onnxruntime $ORT_LOWEST, got {v}')"
ort_tests=()
# the paths that lean on the runtime's contrib operators: static caches and their
# bindings, the device graphs, the bundled (int8) pair, launched calls and chains, lanes
for t in test_static_path test_verify_graph test_default_pair test_overlap test_lanes; do
    if [ -f "tests/$t.py" ]; then
        ort_tests+=("tests/$t.py")
    fi
done
echo "again with onnxruntime $ORT_LOWEST: ${ort_tests[*]}"
# the statistical tests of a sampler's law (thousands of generations) run once, above, and
# so does the Qwen2 static export (its operators are the Llama export's, run here)
PYTHONPATH="$lowest" python -m pytest -q -p no:cacheprovider --hypothesis-profile=ci \
    -n 2 --dist loadfile -k "not follows_the_target and not qwen2" "${ort_tests[@]}"
