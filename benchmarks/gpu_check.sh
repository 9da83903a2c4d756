#!/usr/bin/env bash
# The GPU checks in one run, for a lent CUDA machine that has torch but not this project's other
# packages: the gpu-marked tests, then the benchmarks' CUDA rows. Each step has its own time limit
# and writes its log under $OUT (default benchmarks/out/gpu); a failing step does not stop the others.
#
# The packages the machine lacks travel as wheels in .whl/ (see benchmarks/RESULTS.md, "GPU"):
#   bash benchmarks/gpu_check.sh            # all steps
#   STEPS="tests extract" bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
STEPS=${STEPS:-"tests permethod metrics cams extract budget"}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
    nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # name, seconds, command...
    local name=$1 secs=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    echo "=== $name ($(date +%T), limit ${secs}s)"
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
}

step tests 100 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -s -W ignore::DeprecationWarning
step permethod 50 python3 benchmarks/bench_extract.py --device cuda --per-method --reps 10 \
    --archs resnet18 efficientnet_lite0 timm:vit_small_patch16_224
step metrics 90 python3 benchmarks/bench_metrics.py --device cuda --n 16 --throughput-only
step cams 100 python3 benchmarks/bench_extract.py --device cuda --cams-only --reps 3 --pgc-reps 1 \
    --archs timm:vit_small_patch16_224 fcn_resnet50
step extract 150 python3 benchmarks/bench_extract.py --device cuda --archs resnet18 efficientnet_lite0 \
    --tiles 1024 --reps 20 --mem-tiles 0 --workers 8
step budget 120 python3 benchmarks/bench_metrics.py --budget --slides 10 --slide-tiles 200 --tile-px 224 \
    --clusters 10 --per-cluster 16 --workers 8
exit 0
