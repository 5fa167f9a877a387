#!/usr/bin/env bash
# The GPU check, in at most 8 minutes on a machine that already has CUDA torch and Triton:
# install the project, run the Triton kernels' tests on CUDA, then the GPU benchmark.
#
#     benchmarks/gpu_check.sh OUT_DIR
#
# Writes to OUT_DIR: environment.json, tests.log (+ tests.xml), bench_fp32.json, bench_amp.json,
# bench_small.json, bench_compile.json, and one log per step. A step that fails or runs out of
# time is recorded and the next one still runs. Benchmark rows marked "skipped" did not fit.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
start=$(date +%s)
total=470 # seconds for everything, a little inside 8 minutes

left() { echo $((total - ($(date +%s) - start))); }

step() { # step NAME SECONDS COMMAND...: run with a time limit, log it, note its exit status
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -le 5 ]; then
        echo "$name: no time left" | tee -a "$out/steps.log"
        return
    fi
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "$name: exit $? after $(($(date +%s) - start)) s" | tee -a "$out/steps.log"
}

: >"$out/steps.log"
step install 120 python -m pip install --no-deps --no-build-isolation -e .
python - >"$out/environment.json" 2>>"$out/steps.log" <<'EOF'
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as err:
    info["triton"] = f"not importable: {err}"
print(json.dumps(info, indent=2))
EOF
cat "$out/environment.json"

# The kernels compiled for the GPU against plain autograd (float64 and float32, every gradient).
# --noconftest: tests/conftest.py needs h5py, which a bare torch image may lack; these tests
# do not use it.
if python -c "import pytest" 2>/dev/null; then
    step tests 150 python -m pytest -q -p no:cacheprovider --noconftest \
        tests/test_triton_kernels.py --junitxml="$out/tests.xml"
else
    echo "tests: pytest is not installed here, skipped" | tee -a "$out/steps.log"
fi

bench() { # bench NAME SHARE_OF_WHAT_IS_LEFT_PERCENT ARGS...
    local name=$1 share=$2
    shift 2
    local limit=$(($(left) * share / 100))
    step "bench_$name" "$limit" python benchmarks/bench_model.py --device cuda --repeats 5 \
        --child-timeout 120 --budget-s $((limit - 40 > 0 ? limit - 40 : 1)) \
        --json "$out/bench_$name.json" "$@"
}

# Most important first: the paper model (the targets are for batch 128).
bench fp32 45 --models paper --batch 128 32 --impls triton torch plain --precision fp32
bench amp 35 --models paper --batch 128 32 --impls triton torch --precision amp
bench compile 50 --models paper --batch 128 --impls triton --precision fp32 --compile on
bench small 95 --models small --batch 128 32 --impls triton torch plain --precision fp32
echo "done in $(($(date +%s) - start)) s; results in $out" | tee -a "$out/steps.log"
