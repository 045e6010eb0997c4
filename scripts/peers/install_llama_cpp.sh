#!/usr/bin/env bash
# llama.cpp as a benchmark peer: llama-cpp-python (built from source, about 10 minutes on 2 cores), gguf and
# numpy in their own venv, never EffLLM's and never CI's. Then:
#   effllm bench generate --peers transformers,llama.cpp --peer-python .peers/llama.cpp/bin/python
set -euo pipefail
venv="${1:-.peers/llama.cpp}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install --quiet llama-cpp-python gguf numpy
"$venv/bin/python" -c "import llama_cpp, gguf; print('llama-cpp-python', llama_cpp.__version__, 'in', '$venv')"
