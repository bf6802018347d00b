#!/usr/bin/env bash
# The whole GPU benchmark suite of the fused linear KL in ONE call of the device tool, e.g.
#     run(command="bash bench/gpu.sh", carry=["bench/wheels"], timeout_s=600)
# on a CUDA machine that has torch + triton but no internet. Before the call, on a machine with internet:
#     bash bench/fetch_wheels.sh          # fills bench/wheels/ (git-ignored, hence carried explicitly)
# Writes to $OUT (default ./bench-out): rows.jsonl (one line per finished case, survives a time-out),
# bench-<stage>.json (pytest-benchmark), stage logs, env.txt, accuracy.md (bf16/fp32 errors vs float64),
# profile.md (time by kernel family per backward schedule) and results.md, the markdown table also printed last.
# Stages run most-important first, each under the time left of GOPD_BENCH_BUDGET_S (default 540 s, so the
# call ends inside the device tool's 600 s limit even if a stage is cut short).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
OUT=${OUT:-$PWD/bench-out}
BUDGET_S=${GOPD_BENCH_BUDGET_S:-540}
START=$(date +%s)
mkdir -p "$OUT"
export GOPD_BENCH_JSONL="$OUT/rows.jsonl"
export TOKENIZERS_PARALLELISM=false
: > "$GOPD_BENCH_JSONL"

log() { echo "[gpu.sh $(date +%T)] $*"; }

# 1. Packages: the carried wheels (--no-deps, never touching the image's torch/triton), then this repository.
WHEELS=bench/wheels
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    for pkg in liger_kernel cut_cross_entropy; do
        $PY -c "import $pkg" 2>/dev/null || $PY -m pip install --quiet --no-index --no-deps "$WHEELS"/${pkg}-*.whl \
            || log "could not install $pkg from $WHEELS (its cases will skip)"
    done
    for pkg in packaging pygments pluggy iniconfig pytest cpuinfo pytest_benchmark; do  # only where missing
        wheel=$pkg; [ "$pkg" = cpuinfo ] && wheel=py_cpuinfo
        $PY -c "import $pkg" 2>/dev/null || $PY -m pip install --quiet --no-index --no-deps "$WHEELS"/${wheel}-*.whl \
            || log "could not install $pkg from $WHEELS"
    done
else
    log "no wheels in $WHEELS: Liger/CCE cases skip unless the image has them (run bench/fetch_wheels.sh and carry it)"
fi
$PY -m pip install --quiet --no-deps --no-build-isolation -e . || { log "installing gopd-fast failed"; exit 1; }

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    $PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for name in ("triton", "liger_kernel", "cut_cross_entropy", "pytest_benchmark"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "installed"))
    except ImportError as err:
        print(name, "MISSING", err)
EOF
    git rev-parse HEAD 2>/dev/null || true
} | tee "$OUT/env.txt"

# 2. Stages: the issue's target shape first (both objectives, every implementation, the matmul rate), then the
# rest of the shape grid for the reverse objective, smallest N first.
TEST=bench/test_bench_fused_linear_kl.py
run_stage() {  # name, pytest -k expression
    local name=$1 expr=$2
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 20 )); then log "skipping stage $name: time budget spent"; return; fi
    log "stage $name (at most ${left}s): -k '$expr'"
    timeout --signal=INT --kill-after=15 "$left" $PY -m pytest "$TEST" -q -rs -p no:cacheprovider \
        --benchmark-enable --benchmark-only --benchmark-json="$OUT/bench-$name.json" -k "$expr" \
        > "$OUT/stage-$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/stage-$name.log"
    log "stage $name exit code $rc"
}
log "accuracy vs float64 on the GPU (bf16 and fp32), at most 90 s"
timeout 90 $PY bench/kernels_accuracy.py --dtypes bfloat16,float32 --n 2048 --vocab 32768 --ds 1024 --dt 2048 \
    > "$OUT/accuracy.md" 2>&1
log "accuracy exit code $?"; cat "$OUT/accuracy.md"

TARGET="N16384-Ds4096-Dt4096"
run_stage target "matmul_rate or $TARGET"
log "profile by kernel family at the target shape, every backward schedule (at most 120 s)"
timeout 120 $PY bench/profile_fused_linear_kl.py --out "$OUT/profile.md" > "$OUT/profile.log" 2>&1
log "profile exit code $?"; cat "$OUT/profile.md" 2>/dev/null || tail -n 20 "$OUT/profile.log"
run_stage n1024 "gpu and reverse and N1024-"
run_stage n4096 "gpu and reverse and N4096-"
run_stage n16384 "gpu and reverse and N16384- and not $TARGET"

# 3. The table (rows.jsonl holds every finished case, even from a stage cut short).
$PY bench/report.py "$GOPD_BENCH_JSONL" --out "$OUT/results.md"
log "done in $(( $(date +%s) - START ))s; results in $OUT"
