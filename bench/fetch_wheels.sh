#!/usr/bin/env bash
# Download the wheels bench/gpu.sh installs on the offline GPU machine into bench/wheels/ (git-ignored).
# Only pure-Python packages, with --no-deps: the GPU image's own torch and triton are never replaced.
# Run on a machine with internet, then carry the folder: run(command="bash bench/gpu.sh", carry=["bench/wheels"]).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
PY=${PYTHON:-python3}
# The comparison libraries (same pins as the CPU lock), then the test runner in case the image lacks it.
$PY -m pip download --quiet --no-deps --only-binary=:all: --dest wheels \
    liger-kernel==0.8.5 cut-cross-entropy==25.1.1 \
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 Pygments==2.21.0 \
    pytest-benchmark==5.3.1 py-cpuinfo==9.0.0
ls -l wheels
