#!/usr/bin/env bash
# The llama.cpp benchmark's own environment, benchmarks/.venv-llamacpp (git-ignored), never CI's:
# torch, decodekit with the gguf extra, and llama-cpp-python built from source (cmake; ~20-40 min
# on 2 cores). On a shared machine run it under the benchmark lock:
#   flock /work/cpu.lock bash benchmarks/llamacpp/setup.sh
# Then: benchmarks/.venv-llamacpp/bin/python benchmarks/bench_llamacpp.py
set -euo pipefail
cd "$(dirname "$0")/../.."

TORCH_VERSION=2.13.0
LLAMA_CPP_PYTHON_VERSION=0.3.36
VENV=benchmarks/.venv-llamacpp

python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install --upgrade pip
pip install "torch==$TORCH_VERSION" -c constraints.txt -e ".[gguf]"
# a CPU build for this machine's instruction set (GGML_NATIVE), no GPU back end
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
pip install --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
python -c "import llama_cpp, decodekit, gguf; print('llama-cpp-python', llama_cpp.__version__, '| decodekit ready')"
