#!/usr/bin/env bash
# Everything a GPU session measures, in one command (device time is billed by the minute).
# A lent GPU's first minutes answer "does it work" before "how fast": first the norm-layer
# calls recorded from the shipped configs (tests/data/norm_calls.json) replayed on the GPU,
# the kernels against the reference, forward and backward (benchmarks/replay_norm_calls.py,
# torch and triton only); then the kernel tests at ResNet-50 shapes and compiled on the GPU;
# then every benchmark.
#
#   bash benchmarks/gpu_run.sh OUT_DIR eager|compiled [WHEELS_DIR]
#
# 'eager': the replay, the GPU tests and the SN, SW and ResNet-50 step benchmarks; 'compiled': the
# ResNet-50 steps under torch.compile (BN, SN and SW7 on the reference and on the kernels'
# custom ops; inductor needs minutes per model). Two calls, each within the device tool's
# 10 minutes. Needs torch and triton; pytest is installed from WHEELS_DIR (e.g. made here with
# `pip download pytest -d .wheels`) when the machine has none. Writes OUT_DIR/log.txt (test
# summary and every table) and the CSVs.
set -u
usage='usage: gpu_run.sh OUT_DIR eager|compiled [WHEELS_DIR]'
out=${1:?$usage}
stage=${2:?$usage}
wheels=${3:-}
case "$stage" in eager|compiled) ;; *) echo "stage: expected eager or compiled, got '$stage'" >&2; exit 2 ;; esac
mkdir -p "$out"
log="$out/log.txt"
if ! python -c 'import pytest' 2>/dev/null && [ -n "$wheels" ]; then
    python -m pip install -q --no-index --find-links "$wheels" pytest >>"$log" 2>&1
fi
python - >>"$log" 2>&1 <<'PY'
import platform, torch, triton
print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton',
      triton.__version__, '| CUDA', torch.version.cuda, '| python', platform.python_version())
PY
if [ "$stage" = compiled ]; then
    python benchmarks/bench_resnet50_step.py --compile --kinds bn sn sn@triton sw7 sw7@triton \
        --csv "$out/resnet50_step_compiled.csv" >>"$log" 2>&1
    echo "wrote $out" >>"$log"
    exit 0
fi
# the replay compiles every kernel variant the recorded calls need: in parallel, one process
# per 2 cores, and starts nothing after 5 minutes; its table (errors in units of tolerance)
# goes to the log and replay.csv
jobs=$(( $(nproc) / 2 )); [ "$jobs" -ge 1 ] || jobs=1
python benchmarks/replay_norm_calls.py --jobs "$jobs" --time-limit 300 --csv "$out/replay.csv" >>"$log" 2>&1
echo "replay of the recorded calls: exit $?" >>"$log"
# -k on_the_gpu: the other kernel tests build CPU tensors for the interpreter
python -m pytest -q -p no:cacheprovider -o addopts='' -k on_the_gpu \
    tests/test_triton_kernels.py tests/test_compile.py 2>&1 | tail -40 >>"$log"
python benchmarks/bench_switch_norm.py --csv "$out/switch_norm.csv" >>"$log" 2>&1
python benchmarks/bench_switch_whiten.py --csv "$out/switch_whiten.csv" >>"$log" 2>&1
python benchmarks/bench_resnet50_step.py --csv "$out/resnet50_step.csv" >>"$log" 2>&1
echo "wrote $out" >>"$log"
