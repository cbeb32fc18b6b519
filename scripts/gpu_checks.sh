#!/usr/bin/env bash
# Every check that needs a GPU, as one short script for a lent GPU machine (docs/gpu.md):
# the gpu-marked tests, the GPU weight-transport bench and the learner MFU bench.
# Logs and JSON go to $OUT. Packages the GPU image lacks travel as wheels in .whl/
# and the tiny test model in .gpucache/ (docs/gpu.md says how to prepare both).
# STAGES picks some of "tests weights learner" (default all three).
set -u
STAGES=${STAGES:-tests weights learner}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
[ -d .gpucache ] && export STREAMRL_CACHE=$PWD/.gpucache
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [[ $STAGES == *tests* ]]; then
  timeout "${TESTS_S:-180}" python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py tests/test_gpu_weights.py tests/test_sum64.py 2>&1 | tee "$OUT/pytest.log"
fi
if [[ $STAGES == *weights* ]]; then
  timeout "${WEIGHTS_S:-150}" python3 -m bench.weights --gpu --gap 0.5 --out "$OUT" 2>&1 | tee "$OUT/weights.log"
fi
if [[ $STAGES == *learner* ]]; then
  timeout "${LEARNER_S:-200}" python3 -m bench.learner_gpu --profile --out "$OUT" 2>&1 | tee "$OUT/learner.log"
fi
