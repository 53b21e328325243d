#!/usr/bin/env bash
# Issue 13's GPU checks in one command, for one device session (H100/H200, ~5 minutes):
# the GPU-marked tests of varlen attention and Liger, then every row of bench/gpu.py.
#
# Here, once (the wheel is not in git; /.whl/ is ignored):
#   python -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
# Then, through the device tool, with carry [".whl"] and timeout_s 480 (a partial rerun still fits):
#   bash bench/device_run.sh
# Outputs under $OUT (at most 8 files come back): gpu_tests.log, gpu_bench.log, gpu_bench.json.
# Rerun a part: SECTIONS=overhead,evaluator bash bench/device_run.sh, or CONFIGS="packed mb32
# varlen liger-flce compile" for chosen throughput rows, or SKIP_TESTS=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

# Liger Kernel from the carried wheel; Triton comes with the machine's torch. --no-deps keeps
# the machine's torch: the project's pins do not apply there.
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/liger_kernel-*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/liger_kernel-*.whl carried: Liger rows and tests will fail" | tee "$OUT/gpu_tests.log"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'EOF' | tee -a "$OUT/gpu_bench.log"
import torch, transformers, importlib.util
from lit_sft import available
print(f"torch {torch.__version__} cuda {torch.version.cuda} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA'}; "
      f"transformers {transformers.__version__}; liger {available.has_liger()}; varlen_attn {available.has_varlen_attn()}; "
      f"triton {importlib.util.find_spec('triton') is not None}")
EOF

if [ -z "${SKIP_TESTS:-}" ]; then
    # Only this issue's GPU tests: the other GPU-marked ones (evaluator, tuning) need packages the
    # machine lacks (optuna, jsonargparse) and minutes of their own.
    timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_varlen.py tests/test_kernels.py 2>&1 | tee -a "$OUT/gpu_tests.log"
fi

args=()
[ -n "${SECTIONS:-}" ] && args+=(--sections "$SECTIONS")
[ -n "${CONFIGS:-}" ] && args+=(--configs "$CONFIGS")
[ -n "${TINY:-}" ] && args+=(--tiny)  # the CPU check of this script: TINY=1 bash bench/device_run.sh
timeout 340 python3 bench/gpu.py ${args[@]+"${args[@]}"} 2>&1 | tee -a "$OUT/gpu_bench.log"
