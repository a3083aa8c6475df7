#!/usr/bin/env bash
# Install quickdraft with everything its tests need into .venv, then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0        # CPU build; install before anything that needs torch
python -m pip install -q -e ".[test,export,ort,docs]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$(mktemp -d)}"
ruff check quickdraft tests
python -m pytest -q -p no:cacheprovider --hypothesis-profile=ci "$@"
