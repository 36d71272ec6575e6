#!/usr/bin/env bash
# The GPU check: every CUDA path of the project, run for real, in about 5 minutes on one GPU.
#
#   bash tools/gpu_check.sh                       # from the repository root, with the venv's python on PATH
#   PYTHON=.venv/bin/python bash tools/gpu_check.sh
#   DEVICE=cpu ITERS=6 bash tools/gpu_check.sh    # a dry run of the script itself on a CPU (timings meaningless)
#
# It trains the quick start (data/shapes, written once) in float32 and with --amp, channels-last and NCHW;
# kills a --deterministic run with kill -9 and resumes it, then compares its weights with an uninterrupted
# run's (and does the same without --deterministic, to show the difference); runs torchrun on all GPUs,
# --eval-only, infer.py and tools/bench.py --quick on the GPU. One line a check: PASS or FAIL, then its figures.
# Logs and runs go to $OUT (default runs/gpu_check); the lines also to $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
ITERS=${ITERS:-300}
OUT=${OUT:-runs/gpu_check}
SHORT=$((ITERS / 3))
rm -rf "$OUT" && mkdir -p "$OUT"
NGPU=$($PY -c "import torch; print(max(torch.cuda.device_count(), 1))")
$PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'no CUDA device', '|', torch.cuda.device_count(), 'GPU(s)')" | tee "$OUT/summary.txt"
[ -f data/shapes/annotations/instances_val.json ] || $PY shapes.py > "$OUT/shapes.log" 2>&1

schedule() { echo "--iters $1 --steps $(($1 * 3 / 4)) $(($1 * 9 / 10)) --warmup-iters $(($1 / 10 + 1))"; }
train() { local out=$1 iters=$2; shift 2; $PY train.py --device "$DEVICE" $(schedule "$iters") --no-eval --out "$OUT/$out" "$@"; }
speed() { $PY -c "import json, sys; r = [r for l in open(sys.argv[1]) if 'loss' in (r := json.loads(l))][-1]
print(f\"{r['img_per_s']} img/s, loss {r['loss']:.3f} at iteration {r['iter']}\")" "$OUT/$1/metrics.jsonl"; }
report() {  # report NAME STATUS DETAIL
  local line
  if [ "$2" -eq 0 ]; then line="PASS $1: $3"; else line="FAIL $1: $(grep -v '^\s*$' "$OUT/$1.log" | tail -1)"; fi
  echo "$line" | tee -a "$OUT/summary.txt"
}
same_weights() {  # max |a - b| over every weight of two checkpoints
  $PY -c "import sys, torch
a, b = (torch.load(p, map_location='cpu', weights_only=True)['model'] for p in sys.argv[1:])
print(max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()))" "$@"
}
killed_and_resumed() {  # NAME ITERS FLAGS...: kill -9 a run once its checkpoint at ITERS/2 is written, resume it
  local name=$1 iters=$2; shift 2
  local every=$((iters / 4 > 0 ? iters / 4 : 1)) half=$((iters / 2 > 0 ? iters / 2 : 1))
  local flags=(--device "$DEVICE" $(schedule "$iters") --no-eval --out "$OUT/$name" --log-every 1 --ckpt-every "$every")
  $PY train.py "${flags[@]}" "$@" > "$OUT/$name.first.log" 2>&1 &  # python itself, so that kill -9 reaches it
  local pid=$!
  for _ in $(seq 3000); do  # rows are logged before the checkpoint of their iteration: row half + 1 follows it
    kill -0 $pid 2>/dev/null || break
    [ -f "$OUT/$name/metrics.jsonl" ] && [ "$(grep -c '"loss"' "$OUT/$name/metrics.jsonl")" -gt "$half" ] && break
    sleep 0.05
  done
  kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
  $PY train.py "${flags[@]}" --resume "$@" || return 1
}
rows_once() {  # metrics.jsonl has iterations 1..N once each
  $PY -c "import json, sys; rows = [json.loads(l)['iter'] for l in open(sys.argv[1]) if '\"loss\"' in l]
sys.exit(rows != list(range(1, int(sys.argv[2]) + 1)))" "$OUT/$1/metrics.jsonl" "$2"
}

train fp32 "$ITERS" > "$OUT/fp32.log" 2>&1; report fp32 $? "quick start, float32, layout auto (NHWC on CUDA): $(speed fp32)"
train amp "$ITERS" --amp > "$OUT/amp.log" 2>&1; report amp $? "quick start, --amp, NHWC: $(speed amp)"
train amp_nchw "$SHORT" --amp --layout nchw > "$OUT/amp_nchw.log" 2>&1
report amp_nchw $? "--amp --layout nchw: $(speed amp_nchw)"
train amp_nhwc "$SHORT" --amp --layout nhwc > "$OUT/amp_nhwc.log" 2>&1
report amp_nhwc $? "--amp --layout nhwc: $(speed amp_nhwc)"

for mode in deterministic default; do
  flags=(); [ $mode = deterministic ] && flags=(--deterministic)
  train "straight_$mode" "$SHORT" --log-every 1 "${flags[@]}" > "$OUT/straight_$mode.log" 2>&1
  killed_and_resumed "resumed_$mode" "$SHORT" "${flags[@]}" > "$OUT/resume_$mode.log" 2>&1
  status=$?
  at=$(grep -Eo "resumed from .* at iteration [0-9]+" "$OUT/resume_$mode.log" | grep -Eo "[0-9]+$")
  [ -n "$at" ] && [ "$at" -lt "$SHORT" ] || { status=1; echo "the kill came too late: resumed at '$at'" >> "$OUT/resume_$mode.log"; }
  rows_once "resumed_$mode" "$SHORT" || { status=1; echo "metrics.jsonl: not iterations 1..$SHORT once each" >> "$OUT/resume_$mode.log"; }
  diff=$(same_weights "$OUT/straight_$mode/checkpoint.pt" "$OUT/resumed_$mode/checkpoint.pt" 2>>"$OUT/resume_$mode.log")
  if [ $mode = deterministic ] && [ "$diff" != "0.0" ]; then status=1; echo "weights differ by $diff" >> "$OUT/resume_$mode.log"; fi
  report "resume_$mode" $status "kill -9 at iteration ${at:-?} of $SHORT + --resume vs uninterrupted (${flags[*]:-no flag}): \
max |weight difference| $diff, metrics rows once each; $(speed "straight_$mode")"
done

$PY -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train.py --device "$DEVICE" $(schedule 40) \
  --batch-size $((2 * NGPU)) --no-eval --out "$OUT/torchrun" > "$OUT/torchrun.log" 2>&1
report torchrun $? "torchrun --nproc_per_node=$NGPU, 2 images each (NCCL, SyncBatchNorm$([ "$NGPU" = 1 ] && echo ' with one process: its all-reduce is not exercised')): $(speed torchrun)"
$PY train.py --eval-only --weights "$OUT/fp32/checkpoint.pt" --device "$DEVICE" --out "$OUT/eval" > "$OUT/eval.log" 2>&1
report eval $? "--eval-only on the GPU: $(tail -1 "$OUT/eval.log" | cut -c1-80)"
$PY infer.py data/shapes/val/000001.jpg data/shapes/val/000002.jpg --weights "$OUT/fp32/checkpoint.pt" \
  --device "$DEVICE" --out "$OUT/infer" > "$OUT/infer.log" 2>&1
report infer $? "infer.py --device $DEVICE: $(grep -c 'detections' "$OUT/infer.log") images"
$PY -m tools.bench --device "$DEVICE" --quick --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
status=$?
$PY -c "import json, sys; sys.exit(not all(r['equal'] for r in json.load(open('$OUT/bench.json'))['rows']))" 2>/dev/null || status=1
report bench $status "tools.bench --quick: $($PY -c "import json
print('; '.join(f\"{r['what'].split(':')[0]} {r['ratio']:.2f}\" for r in json.load(open('$OUT/bench.json'))['rows']))" 2>/dev/null)"
! grep -q '^FAIL' "$OUT/summary.txt"
