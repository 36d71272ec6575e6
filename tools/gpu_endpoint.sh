#!/usr/bin/env bash
# The endpoint study's (b) and (d) on one GPU (issue 21): a block of seeds on one device and one backbone, so the
# seeds' spread is the seeds' alone (on the CPUs, each session's host brings its own kernels and pretrain.py weights).
#
#   bash tools/gpu_endpoint.sh                                        # from the repository root, on a GPU machine
#   DEVICE=cpu ITERS=8 ROWS=b SEEDS=0 bash tools/gpu_endpoint.sh      # a dry run of the script itself on a CPU
#
# Every (row, seed) trains in a process of its own, all at once (one GPU holds them), with the study's flags
# plus --device (analyze.py endpoint: the same code), at the LRs the CPU study chose on held-out pictures
# (--lrs, CE's and FL's), into a ledger of its own; at the end (or at DEADLINE seconds, when unfinished runs
# are stopped) the ledgers are merged into $OUT/endpoint_runs_cuda.json, the logs into $OUT/logs.tgz.
# The backbone must be runs/pretrain/resnet18_dense.pth from study/pretrain.py (carry it: pretraining on the GPU
# would make another backbone). The dense set is written here if missing (the same set: its digest is in the
# ledger). Report: python analyze.py endpoint --report-only --ledger docs/study/endpoint_runs_cuda.json --lrs ...
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
ITERS=${ITERS:-4000}
ROWS=${ROWS:-"b d"}
SEEDS=${SEEDS:-"0 1 2"}
LRS=${LRS:-"0.01 0.02"}  # the CPU study's choice (docs/study.md, the LR stage): CE 0.01, FL 0.02 per 16 images
DEADLINE=${DEADLINE:-100000}
OUT=${OUT:-runs/gpu_endpoint}
RUNS=runs/gpu_endpoint/runs
mkdir -p "$OUT" "$RUNS"
[ -f runs/pretrain/resnet18_dense.pth ] || { echo "runs/pretrain/resnet18_dense.pth: missing (python -m study.pretrain)"; exit 1; }
$PY -c "import data
from study import ablate, endpoint
ablate.level_data('dense', 'data/dense', True, endpoint.SIZE, endpoint.ANCHORS)  # the set, once, before the runs
data.holdout_split('data/dense', holdout=endpoint.HOLDOUT)" || exit 1
pids=()
for row in $ROWS; do
  for seed in $SEEDS; do
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout "$DEADLINE" $PY analyze.py endpoint --stage table --rows "$row" --seed "$seed" \
      --lrs $LRS --iters "$ITERS" --ledger "$RUNS/$row$seed.json" --train-args "--device $DEVICE" \
      --out "$RUNS/$row$seed" > "$RUNS/$row$seed.log" 2>&1 &
    pids+=($!)
  done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
$PY -c "import glob, json, sys
runs = {k: r for p in sorted(glob.glob(sys.argv[1] + '/*.json')) for k, r in json.load(open(p)).items()}
json.dump(runs, open(sys.argv[2], 'w'))
for k, r in sorted(runs.items()):
    print(k, 'held-out AP', r.get('stats', {}).get('AP'), 'val AP', r.get('val', {}).get('AP'), r['seconds'], 's', r['host'])
print(len(runs), 'runs finished')" "$RUNS" "$OUT/endpoint_runs_cuda.json"
tar czf "$OUT/logs.tgz" "$RUNS"/*.log
exit $status
