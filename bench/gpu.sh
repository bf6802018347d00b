#!/usr/bin/env bash
# The whole GPU check and benchmark of the fused linear KL in ONE call of the device tool, sized so that two such
# calls (a run and a rerun) and the machine's start fit in the 15 minutes of device time a task gets:
#     run(command="bash bench/gpu.sh", carry=["bench/wheels"], timeout_s=360)
# on a CUDA machine with torch + triton and no internet. Before the call, on a machine with internet:
#     bash bench/fetch_wheels.sh          # fills bench/wheels/ (git-ignored, hence carried explicitly)
# Every stage runs under what is left of GOPD_BENCH_BUDGET_S (default 330 s: the device tool's limit is the
# call's timeout_s, 360 above), most important first:
#   1. tests/kernels/test_gpu.py (the bf16 assertions of every schedule, the fp32-accumulating GEMM probe)
#   2. accuracy vs float64 (bench/kernels_accuracy.py, bf16 and fp32)
#   3. the target shape N=16384, Ds=Dt=4096, V=151936, reverse KL, realistic inputs: triton (one_pass),
#      triton_one_stream (one_pass without the side-stream overlap: the A/B), triton_logit_block, triton_skip,
#      torch_compile, torch (eager, where it fits), liger_jsd (Liger 0.8.5 LigerFusedLinearJSD), cce, and the
#      card's bf16 matmul rate
#   4. the skip fraction and its accuracy on realistic inputs (bench/skip_fraction.py)
#   5. the profile by kernel family at the target shape (bench/profile_fused_linear_kl.py)
#   6. while time is left: the forward KL at the target shape, then N=4096 (reverse)
# $OUT (default ./bench-out) receives three files (the device tool returns at most 8):
#   results.md    environment, test summary, accuracy, skip fraction and the benchmark table (report.py)
#   rows.jsonl    one line per finished benchmark case (written as each finishes: survives a time-out)
#   logs.tar.gz   every log, pytest-benchmark JSON, env.txt and profile, written even when a stage fails
# GOPD_BENCH_DRY_RUN=1 checks the script itself on any machine: no installs, each stage logs its command only.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/bench-out}
BUDGET_S=${GOPD_BENCH_BUDGET_S:-330}
DRY_RUN=${GOPD_BENCH_DRY_RUN:-0}
RESERVE_S=15  # kept for the report and the archive at the end
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-sh.XXXXXX")
mkdir -p "$OUT"
export GOPD_BENCH_JSONL="$OUT/rows.jsonl" GOPD_BENCH_INPUTS=realistic TOKENIZERS_PARALLELISM=false
: > "$GOPD_BENCH_JSONL"

bundle() { tar -C "$WORK" -czf "$OUT/logs.tar.gz" . && rm -rf "$WORK"; }
trap bundle EXIT
log() { echo "[gpu.sh $(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$WORK/gpu.log"; }
left() { echo $(( BUDGET_S - RESERVE_S - ($(date +%s) - START) )); }

stage() {  # name, cap in seconds, command...: runs under min(cap, time left), output to $WORK/<name>.log
    local name=$1 cap=$2; shift 2
    local avail; avail=$(left)
    (( avail < cap )) && cap=$avail
    if (( cap < 15 )); then log "skipping $name: time budget spent"; return 0; fi
    log "$name (at most ${cap}s): $*"
    if [ "$DRY_RUN" = 1 ]; then echo "dry run: $*" > "$WORK/$name.log"; return 0; fi
    timeout --signal=INT --kill-after=10 "$cap" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 8 "$WORK/$name.log"
    log "$name exit code $rc"
}

bench() {  # name, cap, pytest -k expression: the fused linear KL benchmark cases
    stage "bench-$1" "$2" $PY -m pytest bench/test_bench_fused_linear_kl.py -q -rs -p no:cacheprovider \
        --benchmark-enable --benchmark-only --benchmark-json="$WORK/bench-$1.json" -k "$3"
}

# 1. Packages: the carried wheels (--no-deps, never touching the image's torch/triton), then this repository.
install() {
    local wheels=bench/wheels
    if ! compgen -G "$wheels/*.whl" > /dev/null; then
        echo "no wheels in $wheels: Liger/CCE cases skip unless the image has them (bench/fetch_wheels.sh)"
    fi
    for pkg in liger_kernel cut_cross_entropy packaging pygments pluggy iniconfig pytest cpuinfo pytest_benchmark; do
        local wheel=$pkg
        [ "$pkg" = cpuinfo ] && wheel=py_cpuinfo
        $PY -c "import $pkg" 2>/dev/null && continue  # only where missing
        $PY -m pip install --quiet --no-index --no-deps "$wheels"/${wheel}-*.whl || echo "could not install $pkg"
    done
    $PY -m pip install --quiet --no-deps --no-build-isolation -e .
}
if [ "$DRY_RUN" = 1 ]; then log "dry run: no installs"; else
    install > "$WORK/install.log" 2>&1 || { log "installing failed"; tail -n 20 "$WORK/install.log"; }
fi

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; } 2>&1
    $PY - <<'PYEOF' 2>&1
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "liger_kernel", "cut_cross_entropy", "pytest_benchmark"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except ImportError as err:
        print(name, "MISSING", err)
PYEOF
    git rev-parse HEAD 2>/dev/null || true
} > "$WORK/env.txt"
cat "$WORK/env.txt"

TARGET="N16384-Ds4096-Dt4096"
BASELINES="not two_pass and not atomic and not chunked and not liger_jsd_loss"
stage test-gpu 90 $PY -m pytest tests/kernels/test_gpu.py -q -rs -p no:cacheprovider
stage accuracy 40 $PY bench/kernels_accuracy.py --dtypes bfloat16,float32 --n 1024 --vocab 16384 --ds 1024 --dt 2048
bench target 150 "matmul_rate or ($TARGET and reverse and $BASELINES)"
stage skip 40 $PY bench/skip_fraction.py --n 1024 --vocab 151936 --ds 1024 --dt 1024 --dtype bfloat16
stage profile 45 $PY bench/profile_fused_linear_kl.py --schedules one_pass --out "$WORK/profile.md"
bench target-forward 60 "$TARGET and forward and $BASELINES"
bench n4096 60 "N4096-Ds4096-Dt4096 and reverse and $BASELINES"

# The report: everything a reader needs first, in one file; the rest is in logs.tar.gz.
{
    echo "# bench/gpu.sh $(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - START )) s"
    echo; echo '```'; cat "$WORK/env.txt"; echo '```'
    echo; echo "## tests/kernels/test_gpu.py"; echo '```'; tail -n 15 "$WORK/test-gpu.log" 2>/dev/null; echo '```'
    echo; echo "## Accuracy vs float64"; cat "$WORK/accuracy.log" 2>/dev/null
    echo; echo "## Skip fraction (realistic inputs)"; cat "$WORK/skip.log" 2>/dev/null
    echo; echo "## Profile at the target shape"; cat "$WORK/profile.md" 2>/dev/null || tail -n 20 "$WORK/profile.log" 2>/dev/null
    echo; echo "## Benchmark"; $PY bench/report.py "$GOPD_BENCH_JSONL" 2>&1
} > "$OUT/results.md"
log "done in $(( $(date +%s) - START ))s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
tail -n 40 "$OUT/results.md"
