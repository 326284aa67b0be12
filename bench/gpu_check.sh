#!/usr/bin/env bash
# Issue 16's GPU check in one device call of at most 8 minutes: the CUDA tests, a CIFAR-10 run of train.py
# (compile, bf16, GPU-resident data) stopped with SIGTERM and resumed, sampling from its checkpoint, and the
# benchmark against both anchors. Every step has its own time cap; one that the time left cannot hold is
# skipped with a note, so the call always ends inside its budget with a summary.
#
#   bash bench/gpu_check.sh [OUT]                 # on the lent GPU; OUT defaults to $OUT, else ./gpu-check
#   bash bench/gpu_check.sh --cpu-dry-run [OUT]   # the same steps at toy sizes on the CPU: checks and times it
#   GPU_CHECK_STEPS=bench-diffusers,bench-lucidrains bash bench/gpu_check.sh   # only these (a rerun)
#
# Needs .gpu/ (cifar10-train-jpeg.npz, unpack_cifar10.py) and .whl/ (the anchors' wheels) carried along:
# bench/README.md says how, and what each step costs. OUT gets at most 8 files, as the device tool brings
# back: summary.md (a line per step: status, seconds, cap, note), checks.txt, grid.png, losses.csv,
# logs.tar.gz (every step's log) and bench/<gpu>-<date>.json and .md. Data and checkpoints stay in $WORK.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ ${1:-} == --cpu-dry-run ]]; then DRY=1; shift; fi
OUT=$(mkdir -p "${1:-${OUT:-gpu-check}}" && cd "${1:-${OUT:-gpu-check}}" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
ONLY=${GPU_CHECK_STEPS:-}
mkdir -p "$WORK/logs" "$WORK/run" "$OUT/bench"
REPO=$(pwd) LOGS=$WORK/logs C10=$WORK/cifar10 CKPT=$WORK/run/checkpoints/gpu-check RUN=$WORK/run/results/gpu-check
export PYTHONUNBUFFERED=1 PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}

# The sizes of each mode. GPU: the cifar10 config as it is, a few hundred steps. CPU: a toy network in fp32
# eager (bf16 is emulated on most CPUs, and compiling takes minutes there), to check the script's logic.
COMMON="--config $REPO/configs/cifar10.yaml --name gpu-check data.dataset=folder data.root=$C10 data.preload=true"
if (( DRY )); then
    BUDGET=${GPU_CHECK_BUDGET:-900} LIMIT="--limit 2000" STOP=20 END=30 DEVICE=cpu
    TRAIN="$COMMON --device cpu train.compile=false train.precision=fp32 train.batch_size=16 train.log_every=5
           train.save_every=10 data.image_size=16 model.base_channels=16 model.channel_mults=[1,2]
           model.num_res_blocks=1 model.attention_resolutions=[8] model.dropout=0.0"
    SAMPLE="--n 16 --steps 5" FOLDER="--n 32 --batch-size 16 --steps 5" BENCH="--quick --device cpu" E2E_OURS=eager
    WHEELS=".whl/*.whl .whl/cpu-dry-run/*.whl"
else
    BUDGET=${GPU_CHECK_BUDGET:-470} LIMIT="" STOP=200 END=300 DEVICE=cuda
    TRAIN="$COMMON --device cuda train.compile=true train.precision=bf16 train.log_every=20 train.save_every=100"
    SAMPLE="--n 64" FOLDER="--n 1000 --batch-size 500" BENCH="" E2E_OURS=compile
    WHEELS=".whl/*.whl"
fi
TRAIN="$TRAIN train.sample_every=100000 train.keep_last=1"
START=$(date +%s) DEADLINE=$(( $(date +%s) + BUDGET - 15 ))  # 15 s kept for the summary and the archive
echo "| step | status | seconds | cap | note |" > "$WORK/summary.md"
echo "|---|---|---|---|---|" >> "$WORK/summary.md"

row() { echo "| $1 | $2 | $3 | $4 | $5 |" >> "$WORK/summary.md"; echo "== $1: $2 (${3}s of ${4}s) $5"; }

wanted() {  # wanted NAME...: whether GPU_CHECK_STEPS (empty: all) names one of them
    local name
    for name in "$@"; do [[ -z $ONLY || ",$ONLY," == *",$name,"* ]] && return 0; done
    return 1
}

# step NAME CAP MIN COMMAND...: run COMMAND with its output in $LOGS/NAME.log, capped at CAP seconds or the
# budget left, whichever is less; skipped when less than MIN seconds are left.
step() {
    local name=$1 cap=$2 min=$3 left rc start note=""
    shift 3
    left=$(( DEADLINE - $(date +%s) ))
    if (( left < min )); then row "$name" skipped 0 "$cap" "${left}s of the budget left, needs ${min}s"; return 1; fi
    (( cap > left )) && { note="cap cut to the ${left}s left; "; cap=$left; }
    echo "== $name: starting (cap ${cap}s), $(( $(date +%s) - START ))s into the check"
    start=$(date +%s)
    STEP_LOG=$LOGS/$name.log timeout --kill-after=10 "$cap" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - start ))
    note+=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | tr '|\r' '/ ' | cut -c1-160)
    if (( rc == 0 )); then row "$name" ok "$took" "$cap" "$note"
    elif (( rc == 124 || rc == 137 )); then row "$name" "TIMEOUT" "$took" "$cap" "$note"
    else row "$name" "FAILED (exit $rc)" "$took" "$cap" "$note"; fi
    return $rc
}

env_info() {
    date -u +%FT%TZ; git log -1 --format='commit %H %s' 2>/dev/null; uname -a
    nvidia-smi 2>&1 | head -n 15
    python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    python3 -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|accelerate|einops|diffusers) "
    lscpu | grep -E "Model name|^CPU\(s\)"
}

install_wheels() {
    # shellcheck disable=SC2086  # the globs are meant to expand
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        $(ls $WHEELS 2>/dev/null) && python3 -m pip list --path "$WORK/site" 2>/dev/null | tail -n +3
}

# train.py until its checkpoint of step $STOP exists, then SIGTERM: it must save and exit with 128 + 15.
train_then_sigterm() {
    cd "$WORK/run" || return 1
    # shellcheck disable=SC2086
    python3 "$REPO/train.py" $TRAIN "train.max_steps=$END" &
    local pid=$! stop_file
    stop_file=$(printf '%s/step_%07d.pt' "$CKPT" "$STOP")
    while kill -0 "$pid" 2>/dev/null && [[ ! -e $stop_file ]]; do sleep 0.2; done
    kill -TERM "$pid" 2>/dev/null
    wait "$pid"
    local rc=$?
    cp "$RUN/plots/losses.csv" "$WORK/losses-before.csv" 2>/dev/null
    echo "train.py exited with $rc after SIGTERM (expected 143)"
    (( rc == 143 )) && grep -q "stopped by signal at step" "$STEP_LOG"
}

resume() {
    cd "$WORK/run" || return 1
    # shellcheck disable=SC2086
    python3 "$REPO/train.py" $TRAIN "train.max_steps=$END" && grep -q "resuming from" "$STEP_LOG"
}

# The resumed run's loss history holds the interrupted run's rows unchanged, goes on to step $END with every
# value finite, and its first logged losses are where the interrupted run's last ones were.
check_resume() {
    python3 - "$WORK/losses-before.csv" "$RUN/plots/losses.csv" "$END" "$LOGS" <<'EOF'
import csv, glob, math, sys
before, after, end, logs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
a, b = (list(csv.DictReader(open(p))) for p in (before, after))
steps, losses = [int(r["step"]) for r in b], [float(r["loss"]) for r in b]
head = [float(r["loss"]) for r in b[len(a):len(a) + 3]]
tail = [float(r["loss"]) for r in a[-3:]]
ratio = (sum(head) / len(head)) / (sum(tail) / len(tail)) if head and tail else float("nan")
skipped = [line for f in glob.glob(f"{logs}/*.log") for line in open(f, errors="replace") if "non-finite" in line]
checks = [("the interrupted run's rows are kept", b[:len(a)] == a, f"{len(a)} rows before, {len(b)} after"),
          ("the steps go on to the end", steps == sorted(set(steps)) and steps[-1] == end, f"last step {steps[-1]}"),
          ("every logged loss is finite", all(map(math.isfinite, losses)), f"first {losses[0]:.4f}, last {losses[-1]:.4f}"),
          ("no non-finite step was skipped", not skipped, skipped[0].strip()[:120] if skipped else "none"),
          ("the loss continues", 0.6 < ratio < 1.5, f"first 3 logged after / last 3 before the resume = {ratio:.3f}")]
for name, ok, detail in checks:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
sys.exit(0 if all(ok for _, ok, _ in checks) else 1)
EOF
}

# evaluate.py needs torch-fidelity and the Inception weights, which are not on the machine: it must stop with
# its one-line error before it samples (exit code 2). Its sampling path, sample_to_folder, is the sample-folder step.
evaluate_without_weights() {
    python3 evaluate.py --ckpt "$CKPT/last.pt" --n 100 --device "$DEVICE"
    local rc=$?
    echo "evaluate.py exited with $rc (2 = the one-line error expected without torch-fidelity or its weights)"
    (( rc == 2 ))
}

# ---- the steps, most important first ------------------------------------------------------------------------
export WHEELS WORK
export -f env_info install_wheels  # timeout runs commands, not shell functions: each through bash -c
step env 20 5 bash -c env_info
step wheels 30 10 bash -c install_wheels
wanted train bench-e2e-ours bench-e2e-lucidrains && step data 90 20 python3 .gpu/unpack_cifar10.py "$C10" $LIMIT
wanted cuda-tests && step cuda-tests 150 60 python3 -m pytest -q -p no:cacheprovider --durations=10 tests/test_cuda.py
export TRAIN END STOP CKPT RUN WORK LOGS REPO DEVICE
export -f train_then_sigterm resume check_resume evaluate_without_weights
if wanted train; then
    step train 200 90 bash -c train_then_sigterm && step resume 120 40 bash -c resume && step check 20 5 bash -c check_resume
fi
if [[ -e $CKPT/last.pt ]]; then
    # shellcheck disable=SC2086
    wanted sample && step sample 90 30 python3 sample.py --ckpt "$CKPT/last.pt" --device "$DEVICE" $SAMPLE \
        --out "$WORK/grid.png" --process "$WORK/process.png" --gif "$WORK/denoising.gif"
    # shellcheck disable=SC2086
    wanted sample-folder && step sample-folder 90 30 python3 sample.py --ckpt "$CKPT/last.pt" --device "$DEVICE" \
        $FOLDER --save-dir "$WORK/samples"
    wanted evaluate && step evaluate 45 15 bash -c evaluate_without_weights
elif wanted sample sample-folder evaluate; then
    row sample skipped 0 - "no checkpoint: the train step did not write one"
fi
for impl in ours diffusers lucidrains; do
    # shellcheck disable=SC2086
    wanted "bench-$impl" && step "bench-$impl" 150 60 python3 bench/bench.py $BENCH --parts compute,sample \
        --impls "$impl" --out "$OUT/bench"
done
# end to end as users run each: train.py compiled (its default on CUDA), lucidrains' Trainer eager (it does not compile)
# shellcheck disable=SC2086
wanted bench-e2e-ours && step bench-e2e-ours 150 60 python3 bench/bench.py $BENCH --parts e2e --impls ours \
    --settings "$E2E_OURS" --data "$C10" --out "$OUT/bench"
# shellcheck disable=SC2086
wanted bench-e2e-lucidrains && step bench-e2e-lucidrains 120 60 python3 bench/bench.py $BENCH --parts e2e \
    --impls lucidrains --settings eager --data "$C10" --out "$OUT/bench"

# ---- what comes back: at most 8 files --------------------------------------------------------------------------
[[ -e $LOGS/check.log ]] && cp "$LOGS/check.log" "$OUT/checks.txt"
[[ -e $WORK/grid.png ]] && cp "$WORK/grid.png" "$OUT/grid.png"
[[ -e $RUN/plots/losses.csv ]] && cp "$RUN/plots/losses.csv" "$OUT/losses.csv"
cp "$WORK/process.png" "$WORK/denoising.gif" "$RUN/plots/loss.png" "$LOGS/" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs summary.md
{ echo "# GPU check, $(date -u +%F), $(( $(date +%s) - START )) s of a ${BUDGET} s budget"; echo
  echo "mode: $( (( DRY )) && echo 'CPU dry run (toy sizes)' || echo GPU), commit $(git rev-parse --short HEAD 2>/dev/null)"; echo
  cat "$WORK/summary.md"; } > "$OUT/summary.md"
echo; cat "$OUT/summary.md"
