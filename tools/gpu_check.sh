#!/usr/bin/env bash
# Run the megatron-backend tests (tests/test_megatron_backend.py) on a GPU machine, in one call.
#
#   bash tools/gpu_check.sh            # needs >= 2 GPUs (2 processes, one GPU each)
#
# parallel.backend=megatron is GPU-only (megatron-core 0.16.1's optimizers allocate on 'cuda'),
# so these tests skip on CPU. Expects the project's venv (.venv) or an environment with
# torch (CUDA build), megatron-core 0.16.1 and pytest; writes the pytest log to $OUT if set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
python - <<'PY'
import torch, sys
n = torch.cuda.device_count()
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, {n} GPU(s)")
if n < 2:
    sys.exit("gpu_check: the megatron-backend runs need 2 GPUs (one per process)")
PY
log="${OUT:-/tmp}/gpu_check.log"
timeout 540 python -m pytest -x -rs -v tests/test_megatron_backend.py 2>&1 | tee "$log"
