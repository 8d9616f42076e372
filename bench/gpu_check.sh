#!/usr/bin/env bash
# Every GPU check of the project in one prepared script, for a session that has the GPU machine.
# Prints one table at the end and leaves JSON (and a plot) under $OUT.
#
#   bash bench/gpu_check.sh                      # all phases, within BUDGET seconds (default 570)
#   bash bench/gpu_check.sh dali throughput      # only these phases, in the order named
#   DRY=1 bash bench/gpu_check.sh                # on a CPU, toy sizes: checks the script itself
#
# Phases (the default list, in this order; times seen on one H200 on 2026-11-30,
# bench/results/h200-2026-11-30.md):
#   env         nvidia-smi, versions                                            (6 s)
#   splitbn     bench/split_bn.py: plain BN, split BN's whole-batch kernel, its per-sub-batch reference,
#               the official demo's regroup and the Triton kernels (kernels/split_bn_triton.py),
#               forward + backward on each BN shape of the ResNet-50 encoder at batch 256, fp16 (the
#               H200's 154 ms step) then bf16 (--amp auto), channels-last:
#               which split-BN path is fastest (not run on a GPU yet; under a minute expected before
#               the Triton column, whose compiles, a few a dtype, fall in its warmup: a 90 s box a dtype)
#   tests       pytest -m "gpu and not slow" (sync-free step, CUDA graph, Triton kernels, resume on CUDA,
#               DALI/resident GPU paths, ...): test_sync_free.py first, so that a short budget still
#               proves the step sync-free; then the CUDA cases never run on a GPU (split BN's torch and
#               Triton kernels, the fused augmentation kernels), test_train.py, the rest, DALI's last
#               (on 2026-11-30: 28 tests in 45 s, DALI's 5 in 55 s more; now 56 and DALI's 48, not
#               timed, the Triton ones compiling their kernels first)
#   throughput  bench/throughput.py, synthetic input, ResNet-50 MoCo v2 batch 256, in the order that
#               loses the least to a box that runs out: the reference row; fp16 eager on split BN's
#               torch passes (trainer:fp16, with a profile breakdown), on its Triton kernels (+bntriton)
#               and on plain BN (+noshuffle, as the official ImageNet code on one GPU); fp16 + CUDA
#               graph, split BN's torch passes then its Triton kernels; bf16 on split and plain BN
#               (against fp16: --amp auto); the reference on plain BN; the Triton EMA; bf16 + CUDA
#               graph; the torch.compile rows last (each compiles for 1-2 min). A row is 10 warm-up and
#               30 timed steps (2.5-9.5 s at the 60-235 ms steps seen) besides its model, cuDNN's search
#               or the graph's capture; the profile is 3 steps more. On 2026-11-30, 7 rows and the
#               profile ran, then the first compile row until the box ended (345 s, the first 3 rows
#               contended); the 11 rows before the compile rows now, not timed, are expected to take
#               most of the 330 s box, the compile rows not reached
#   cifar-speed ResNet-18 CIFAR step (the cifar preset, batch 512) fed by --loader resident from
#               CIFAR-10: trainer eager / CUDA graph, end-to-end, loader; predicts the 200-epoch wall
#               time (37 s)
#   momentum    bench/momentum_kernels.py: every EMA backend, ResNet-50 + head   (10 s)
#   e2e         bench/throughput.py --loader torch on the demo set or E2E_DATA=folder (loader,
#               end-to-end)   (~1 min expected; its 120 s box ran out at 92 img/s, a loader defect,
#               fixed since)
#   hooks       the two phases ffcv and dali:
#     ffcv      bench/ffcv_loader.py: its GPU augmentation rows, torch's and the fused Triton
#               kernels', 10 s each (~50 s expected), always; first the whole FFCV rows where ffcv is
#               importable and FFCV_DATA=folder (ffcv-loader.json; DRY: 1.5-2 min on 2 cores for the
#               demo set, moco_fast/demo_data/train)
#     dali      DALI end to end (bench/throughput.py --loader dali [DALI_DATA=folder]), needs DALI
#               brought over: ../shared/device/README.md (43 s)
#   tests-slow  pytest -m "gpu and slow": the one-worker distributed overhead (issue 5, < 3%: three
#               ResNet-50 steppers, an NCCL worker) and the compiled CUDA-graph step's sync check
#               (a cold torch.compile) (197 s)
# One 10-minute command does not hold them all. A phase starts only where half its time box is left
# of BUDGET, its box cut to what is left, so a command never runs past its limit; the phases skipped
# are named at the end: run those as a second command. The first main command is the default's first
# four, `env splitbn tests throughput`: their boxes (30 + 2 x 90 + 200 + 330 s) hold more than the
# default BUDGET of 570, so throughput gets what the three before it leave: its whole 330 s where they
# take 230 s or less (env 6 s, splitbn ~2 x 60 s and tests ~100 s expected), 174 s where splitbn and
# tests fill their boxes, only 9 s above the 165 s (half its box) it needs to start: a phase stopped
# at its box's end may run up to 15 s more (timeout's --kill-after): 10 s of them skip throughput.
# Throughput fills its box (the compile rows), so cifar-speed follows only where env, splitbn and
# tests took under ~155 s. The second, `ffcv dali e2e momentum` (DALI brought over; DALI_DATA and
# E2E_DATA carried), takes ~3 min at the times above. With the machine's start and the carries, the
# two take ~14 of a session's 15 minutes.
# Not in the default list (a command of its own, ~9.5 min):
#   cifar       the issue-7 target run: `moco-fast train --preset cifar --loader resident` on CIFAR-10,
#               200 epochs (CIFAR_FLAGS adds flags: --cuda-graph, which the H200's cifar-speed rows
#               put at ~7 min against ~20 eager), then kNN on backbone and head.
#               It resumes from runs/cifar10-r18 when run again on the same warm machine.
#   cifar-lincls the linear protocol on that checkpoint (runs/cifar10-r18, so the same warm machine, in
#               the command after `cifar`'s): 100 epochs, lr 30, steps at 60 and 80, evaluated every 10
#               epochs (best and last); it continues with --resume when run again (its state is kept
#               after every epoch). Never `cifar cifar-lincls` in one command: cifar's 560 s box leaves
#               cifar-lincls less than the half of its own 560 s it needs to start (the script refuses
#               the two together unless BUDGET holds both).
# CIFAR-10 travels as one pack (bench/pack_folder.py; 60,000 files as a tar would pass 64 MiB):
#   here:  python bench/pack_folder.py pack ../shared/data/cifar10 .devdata/cifar10.npz
#   then:  run(command="bash bench/gpu_check.sh cifar-speed", carry=[".devdata/cifar10.npz"])
# A session is lent 15 minutes of device time, machine start included (47 s on 2026-11-30). What one
# session did then (bench/results/h200-2026-11-30.md): call 1 carries .device-dali/p1 and starts
# `gpu_check.sh env tests` in the background (setsid, output to /tmp), calls 2-4 carry p2-p4 (6 s
# each, the machine stays warm 30 s), one call carries the data (ImageNet JPEGs for DALI_DATA and
# E2E_DATA, a CIFAR pack), the main call carries p5, installs DALI, waits for the background run to
# END, then runs the timed phases. Never let a background phase overlap a timed one: stopping one
# takes `p=$(cat /tmp/gco/gpu_check.pid) && kill -INT $p && pkill -INT -P $p -x timeout` (the
# script writes its pid to $OUT/gpu_check.pid and removes it at its end; on INT or TERM it runs no
# further phase but still prints its table; the phase running under `timeout`, in a process group of
# its own that a signal to the script's group misses, is stopped through that timeout, which passes
# the signal on to the phase's whole group). Not `pkill -f bench/gpu_check.sh`: it matches the
# calling command's own command line, which names the script. The working tree
# (counted there as 8-17 MB: p1 with 9 MB more was refused) counts toward each call's 64 MiB.
# Still owed, in order (a later session takes the next one):
#   1. `env splitbn tests throughput`: which split-BN path to keep (splitbn; the bntriton rows against
#      trainer:fp16), the CUDA cases never run on a GPU (split BN's torch and Triton kernels, the
#      bntriton CUDA graph's sync check, the fused augmentation kernels on FFCV's uint8 batch), issue
#      6's 3.5x and bf16 against fp16, uncontended and after the split-BN rewrite
#   2. `ffcv dali e2e momentum`: issue 4's < 5% (the aug-*-triton rows against torch's), issue 3's
#      >= 95% against a fast trainer, the torch loader's batch parts, the EMA backends again (the
#      Triton EMA's host time removed)
#   3. the compile rows, which 1's box does not reach (issue 6's compiled figures): `throughput` with
#      THROUGHPUT_ROWS=reference,trainer:fp16+compile,trainer:fp16+compile+graph,trainer:bf16+compile
#   4. cifar with CIFAR_FLAGS=--cuda-graph: issue 7's 200-epoch run; then cifar-lincls (a command of
#      its own, on the same warm machine)
#   5. tests-slow alone (issue 5's one-worker overhead, measured while the GPU was shared in 2026-11)
# That plan's time, added up (2026-12-01, on paper: nothing timed): the 900 s count the machine's
# start (47 s once; "minutes" by the tool's notes), each call's transfer, the idle time between calls
# and the commands: ~60 + p1-p4 and the data (5 calls, ~15 s each) + 1's 570 + 2's ~180 = ~885 s
# before any pause between calls, so 2 (DALI, e2e, the FFCV augmentation rows: issues 3 and 4) is
# what a session loses. FFCV itself is not on the machine: its whole rows cannot run there. Proposed
# instead, the figures the issues owe first, nothing timed beside another GPU job:
#   call 1 (carry p1): copy p1; then in the background, not timed beside anything (the calls below
#     only copy files): `(OUT=/tmp/gco BUDGET=280 TESTS="tests/test_sync_free.py
#     tests/test_split_bn_triton.py" bash bench/gpu_check.sh env momentum splitbn tests; touch
#     /tmp/bg.done) >/tmp/bg.log 2>&1 &` under setsid (~30 s momentum + 2 x <90 s splitbn; the tests
#     get what is left). /tmp/gco, not the call's $OUT: each call has its own, and only the last
#     call's comes back
#   calls 2-4: p2-p4; call 5: the ImageNet subset (DALI_DATA=E2E_DATA)
#   call 6 (carry p5): install DALI, `until [ -f /tmp/bg.done ]; do sleep 2; done` (not `pgrep -f
#     bench/gpu_check.sh`: it matches the call's own command line, which names the script), then
#     `OUT=/tmp/gco BUDGET=$((570 - SECONDS)) DALI_DATA=... bash bench/gpu_check.sh dali throughput
#     ffcv`: issue 3's DALI rows (43 s seen), throughput's uncontended rows (3.5x, bf16 against
#     fp16, bntriton), then the FFCV augmentation rows (issue 4) if ~45 s are left; the summary
#     takes in the background's JSON too (the same OUT); last `cp /tmp/bg.log /tmp/gco/* "$OUT"/`.
#   ~60 + 5 x 15 + 570 = ~705 s, ~3 min to spare for pauses; e2e, the compile rows, the rest of the
#   tests, cifar and tests-slow go to the session after.
#   Compiles are not what the boxes wait on: split BN's six kernels (ResNet-50's BN shapes at batch
#   256, 8 splits, fp16/bf16/fp32, NCHW and channels-last) and the augmentation kernels (FFCV's
#   uint8 views and fp32 batches, v1/v2/cifar, both orders) built for sm_90 as their real launches
#   specialise them, on the CPU with triton 3.8 (the machine has 3.6): each in 0.2-8 s (the blur's
#   23 taps the longest), all without error (2026-12-01: a fake driver whose target is sm_90 and
#   each kernel's JITFunction.warmup with the launch's own arguments; not in the tests).
# Environment: BUDGET, TESTS (test files for tests/tests-slow), THROUGHPUT_ROWS (the throughput
# phase's --rows), CIFAR_DATA, CIFAR_FLAGS, E2E_DATA, DALI_DATA, FFCV_DATA, PYTHON, OUT, DRY.
# First here: `DRY=1 bash bench/gpu_check.sh PHASES` for the phases you will run (the first main
# command: 1.5-2.5 min on the loaded 2-core CPU, the second ~1.2 min).
# The machine has no package registry: nothing is installed. Without an installed moco_fast, a
# symlinked package (moco_fast + loaders/ + kernels/) goes on PYTHONPATH (checked here by a clone
# run with a Python that has the dependencies but not the project).

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-570}
# DRY=1: the same phases on the CPU at toy sizes (ResNet-18, 32 px, one step), to check the script,
# its flags and its summary before spending device time; no figure of a dry run means anything.
DRY=${DRY:-}
if [[ -n $DRY ]]; then
  TP=(--device cpu --arch resnet18 --batch-size 16 --image-size 32 --moco-k 64 --steps 1 --warmup 0 --workers 0)
  MOM=(--device cpu --arch resnet18 --repeats 1 --warmup 0)
  SBN=(--device cpu --arch resnet18 --batch-size 16 --image-size 32 --repeats 1 --warmup 0)
  SBN_DTYPES=(fp32 bf16)  # fp16 needs a GPU (bench/split_bn.py refuses it on the CPU)
  FF=(--device cpu --batch-size 4 --steps 1 --warmup 0 --min-seconds 0)  # bench/ffcv_loader.py's rows, whole and aug-*
  # the Triton rows on the CPU (aug-*-triton: ~20 s; split BN's triton column: ~10 s; the EMA's: ~10 s
  # in momentum and in throughput's trainer:bf16+triton): the interpreter
  TRITON_ENV=(env TRITON_INTERPRET=1)
  TRAIN=(--device cpu --epochs 1 --batch-size 64 --moco-k 128 --stem imagenet --workers 0 --knn-every 0)
  KNN=(--device cpu --workers 0)
  LINCLS=(--device cpu --workers 0 --epochs 2 --schedule 1 --eval-every 1 --batch-size 256)
else
  TP=() MOM=() SBN=() FF=() TRITON_ENV=() TRAIN=() KNN=() LINCLS=()
  SBN_DTYPES=(fp16 bf16)
fi
PHASES=${*:-env splitbn tests throughput cifar-speed momentum e2e hooks tests-slow}
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1
: >"$LOG"
# this command's start: the summary tells the files it wrote from those an earlier command left in $OUT
# (the same OUT on a warm machine)
START=$(date +%s)

if ! $PY -c "import moco_fast.loaders, moco_fast.kernels" 2>/dev/null; then
  SHIM=$(mktemp -d)/site
  mkdir -p "$SHIM/moco_fast"
  for f in moco_fast/*; do ln -s "$PWD/$f" "$SHIM/moco_fast/"; done
  ln -s "$PWD/loaders" "$SHIM/moco_fast/loaders"
  ln -s "$PWD/kernels" "$SHIM/moco_fast/kernels"
  export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
  # `python -m` and `-c` put the working directory first, where ./moco_fast (without loaders/ and
  # kernels/) would shadow the shim: keep it off sys.path (the bench scripts add their own folder).
  export PYTHONSAFEPATH=1
fi

# run NAME MAX_SECONDS COMMAND...: runs under a time box cut to what is left of BUDGET.
STATUS=()
run() {
  local name=$1 max=$2
  shift 2
  if [[ -n ${STOPPED:-} ]]; then
    echo "== $name: not run (the script was stopped)" | tee -a "$LOG"
    STATUS+=("$name: not run (stopped)")
    return
  fi
  local left=$((BUDGET - SECONDS - 10))
  if ((left < max / 2)); then
    echo "== $name: skipped, ${left}s left of BUDGET=${BUDGET}s (needs ~${max}s)" | tee -a "$LOG"
    STATUS+=("$name: skipped (time)")
    return
  fi
  local box=$((max < left ? max : left))
  echo "== $name (time box ${box}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$box" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  STATUS+=("$name: rc=$rc in $((SECONDS - t0))s")
}

phase_env() {
  if [[ -n $DRY ]]; then  # no GPU to describe: the versions only
    run env 30 $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "(dry run: no GPU)")'
  else
    run env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv; \
      $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
  fi
}
# Files named one by one (pytest would merge a file into a folder given beside it, in the folder's
# order), in the order a time box that runs out loses the least: the sync-free step first, then the
# CUDA cases that never ran on a GPU (split BN's torch and Triton kernels, the fused augmentation
# kernels), the trainer's, the rest, and DALI's last (48 cases where DALI is importable, 44 of them
# one image kind each: the first GPU run's one "mixed" case took 35 s).
# TESTS="tests/test_a.py ..." narrows both test phases to those files (e.g. the DALI tests, once DALI is
# brought over).
GPU_TESTS=(-q -rs --durations=8 -p no:cacheprovider --continue-on-collection-errors)
if [[ -n ${TESTS:-} ]]; then
  GPU_TESTS+=($TESTS)
else
  FIRST=(tests/test_sync_free.py tests/test_split_bn_triton.py tests/test_split_bn.py tests/test_augment_triton.py
    tests/test_blur_triton.py tests/test_train.py)
  LAST=(tests/test_dali.py tests/test_dali_inputs.py)
  GPU_TESTS+=("${FIRST[@]}" $(ls tests/test_*.py | grep -vxF -f <(printf '%s\n' "${FIRST[@]}" "${LAST[@]}")) "${LAST[@]}")
fi
phase_tests() {
  run tests 200 $PY -m pytest -m "gpu and not slow" "${GPU_TESTS[@]}"
}
phase_throughput() {
  # In the order a time box that runs out loses the least: the reference; split BN's torch passes
  # (trainer:fp16, the profiled row), its Triton kernels (+bntriton: their compiles fall in the row's
  # warm-up) and plain BN (+noshuffle), eager then graphed; bf16 against fp16 (which decides --amp
  # auto), split and plain BN; plain BN's reference (x ref of the +noshuffle rows, which take the
  # split-BN reference's until it is measured); the Triton EMA (the momentum phase times it alone);
  # bf16 graphed; the torch.compile rows last (1-2 min each to compile).
  ROWS=reference,trainer:fp16,trainer:fp16+bntriton,trainer:fp16+noshuffle,trainer:fp16+graph,trainer:fp16+graph+bntriton
  ROWS=$ROWS,trainer:bf16,trainer:bf16+noshuffle,reference:noshuffle,trainer:fp16+triton,trainer:bf16+graph
  ROWS=$ROWS,trainer:fp16+compile,trainer:fp16+compile+graph,trainer:bf16+compile
  # the same order with bf16 for fp16, no graphs or compiles; the Triton rows under the interpreter (TRITON_ENV)
  [[ -n $DRY ]] && ROWS=reference,trainer:bf16,trainer:bf16+bntriton,trainer:bf16+noshuffle,reference:noshuffle,trainer:bf16+triton
  ROWS=${THROUGHPUT_ROWS:-$ROWS}
  run throughput 330 "${TRITON_ENV[@]}" $PY bench/throughput.py --device cuda --loader synthetic --rows "$ROWS" \
    --steps 30 --warmup 10 --profile --json "$OUT/throughput-synthetic.json" --plot "$OUT/throughput-synthetic.png" \
    "${TP[@]}"
}
# CIFAR-10: unpacked once from the carried pack (or CIFAR_DATA=folder).
CIFAR=${CIFAR_DATA:-/tmp/cifar10}
# A dry run trains on the demo set (same layout) unless CIFAR_DATA names a folder: a CIFAR-10 left
# in /tmp by an earlier run would take a CPU far past the phases' time boxes.
[[ -n $DRY && -z ${CIFAR_DATA:-} ]] && CIFAR=moco_fast/demo_data
unpack_cifar() {
  if [[ ! -d $CIFAR/train && -f .devdata/cifar10.npz ]]; then
    $PY bench/pack_folder.py unpack .devdata/cifar10.npz "$CIFAR" 2>&1 | tee -a "$LOG"
  fi
}
phase_cifar_speed() {
  unpack_cifar
  CIFAR_ROWS=trainer,trainer:graph,end-to-end,end-to-end:graph,loader
  [[ -n $DRY ]] && CIFAR_ROWS=trainer,end-to-end,loader
  if [[ -d $CIFAR/train ]]; then
    run cifar-speed 150 $PY bench/throughput.py --device cuda --preset cifar --arch resnet18 --stem cifar \
      --image-size 32 --batch-size 512 --loader resident --data "$CIFAR" \
      --rows "$CIFAR_ROWS" --steps 50 --warmup 10 \
      --json "$OUT/throughput-cifar.json" "${TP[@]}"
  else
    echo "== cifar-speed: skipped (no CIFAR-10: carry .devdata/cifar10.npz or set CIFAR_DATA)" | tee -a "$LOG"
    STATUS+=("cifar-speed: skipped (no data)")
  fi
}
phase_splitbn() {
  for dtype in "${SBN_DTYPES[@]}"; do
    run "splitbn-$dtype" 90 "${TRITON_ENV[@]}" $PY bench/split_bn.py --dtype "$dtype" --json "$OUT/split-bn-$dtype.json" "${SBN[@]}"
  done
}
phase_momentum() {
  run momentum 90 "${TRITON_ENV[@]}" $PY bench/momentum_kernels.py --json "$OUT/momentum.json" "${MOM[@]}"
}
phase_e2e() {
  run e2e 120 $PY bench/throughput.py --device cuda --loader torch ${E2E_DATA:+--data "$E2E_DATA"} --rows loader,end-to-end,trainer \
    --steps 30 --warmup 10 --json "$OUT/throughput-torch.json" "${TP[@]}"
}
phase_ffcv() {
  if [[ ! -f bench/ffcv_loader.py ]]; then
    echo "== ffcv: skipped (no bench/ffcv_loader.py)" | tee -a "$LOG"
    STATUS+=("ffcv: skipped (missing)")
    return
  fi
  if $PY -c "import ffcv" 2>/dev/null && [[ -n "${FFCV_DATA:-}" ]]; then
    run ffcv 150 $PY bench/ffcv_loader.py --device cuda --data "$FFCV_DATA" --json "$OUT/ffcv-loader.json" "${FF[@]}"
  fi
  # The batched GPU augmentation pass (FFCV's device half) needs neither FFCV nor data, and the whole
  # FFCV rows above do not time it: each order with torch's pass and with the fused Triton kernels'
  # (the whole pass), 10 s a row.
  run ffcv-aug 90 "${TRITON_ENV[@]}" $PY bench/ffcv_loader.py --device cuda --batch-size 256 --min-seconds 10 \
    --rows aug-sample,aug-batch,aug-sample-triton,aug-batch-triton --json "$OUT/ffcv.json" "${FF[@]}"
}
phase_dali() {
  if $PY -c "import nvidia.dali" 2>/dev/null; then
    run dali 150 $PY bench/throughput.py --device cuda --loader dali ${DALI_DATA:+--data "$DALI_DATA"} \
      --rows loader,end-to-end,trainer --steps 30 --warmup 10 --json "$OUT/throughput-dali.json" "${TP[@]}"
  else
    echo "== dali: skipped (DALI is not importable; bring it over as ../shared/device/README.md says)" | tee -a "$LOG"
    STATUS+=("dali: skipped (missing)")
  fi
}

phase_tests_slow() {
  run tests-slow 200 $PY -m pytest -m "gpu and slow" "${GPU_TESTS[@]}"
}

RUN=runs/cifar10-r18
[[ -n $DRY ]] && RUN=$OUT/cifar-run
phase_cifar() {
  unpack_cifar
  if [[ -d $CIFAR/train ]]; then
    RESUME=()
    [[ -f $RUN/checkpoint.pt ]] && RESUME=(--resume)
    run cifar 560 $PY -m moco_fast train --preset cifar --data "$CIFAR" --loader resident --device cuda \
      --knn-every 50 --out "$RUN" "${RESUME[@]}" ${CIFAR_FLAGS:-} "${TRAIN[@]}"
    run cifar-knn 60 $PY -m moco_fast knn --checkpoint "$RUN/checkpoint.pt" --data "$CIFAR" --device cuda \
      --features both "${KNN[@]}"
    cp "$RUN"/metrics.jsonl "$RUN"/summary.json "$RUN"/config.json "$OUT"/ 2>/dev/null
  else
    echo "== cifar: skipped (no CIFAR-10: carry .devdata/cifar10.npz or set CIFAR_DATA)" | tee -a "$LOG"
    STATUS+=("cifar: skipped (no data)")
  fi
}
phase_cifar_lincls() {
  unpack_cifar
  if [[ -d $CIFAR/train && -f $RUN/checkpoint.pt ]]; then
    RESUME=()
    [[ -f $RUN/lincls.state.pt ]] && RESUME=(--resume)
    run cifar-lincls 560 $PY -m moco_fast lincls --checkpoint "$RUN" --data "$CIFAR" --device cuda --workers 16 \
      --eval-every 10 "${RESUME[@]}" "${LINCLS[@]}"
    cp "$RUN"/lincls.json "$OUT"/ 2>/dev/null
  else
    echo "== cifar-lincls: skipped (needs CIFAR-10 and the cifar phase's $RUN/checkpoint.pt)" | tee -a "$LOG"
    STATUS+=("cifar-lincls: skipped (no checkpoint)")
  fi
}
phase_hooks() {
  phase_ffcv
  phase_dali
}

# Every name is checked before anything runs: a misspelt phase would otherwise be a silent no-op.
for p in $PHASES; do
  if ! declare -F "phase_${p//-/_}" >/dev/null; then
    known=$(declare -F | sed -n 's/^declare -f phase_//p' | tr _ - | paste -sd ' ')
    echo "gpu_check.sh: no phase '$p' (phases: $known)" >&2
    exit 2
  fi
done
# cifar's boxes (560 + its kNN's 60 s) leave cifar-lincls less than the half of its 560 s it needs to
# start: refused here, not found skipped ~10 minutes later.
if [[ " $PHASES " == *" cifar "* && " $PHASES " == *" cifar-lincls "* ]] && ((BUDGET < 560 + 60 + 280 + 20)); then
  echo "gpu_check.sh: cifar-lincls cannot start after cifar in one command (cifar's 560 s box leaves it under the 280 s it needs of BUDGET=${BUDGET}s): run cifar-lincls as a command of its own, after cifar's" >&2
  exit 2
fi
# $OUT/gpu_check.pid: this script's pid, to stop a background run without `pkill -f` (which matches
# the caller's own command line): `kill -INT` it, and `pkill -INT -P PID -x timeout` for the phase
# running (see the header). On INT/TERM no further phase runs; the table is still printed.
echo $$ >"$OUT/gpu_check.pid"
trap 'rm -f "$OUT/gpu_check.pid"' EXIT
STOPPED=
trap 'STOPPED=1' INT TERM
for p in $PHASES; do
  if [[ -n $STOPPED ]]; then
    echo "== $p: not run (the script was stopped)" | tee -a "$LOG"
    STATUS+=("$p: not run (stopped)")
    continue
  fi
  "phase_${p//-/_}"
done

# One table of everything measured, last (the reply carries the end of the output).
$PY - "$OUT" "$START" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

sys.path.insert(0, str(Path("bench").resolve()))  # run from the repository's root, as the script cds there
from report import ms_text  # the benches' own tables' ms: two significant digits under 1 ms

out, since = Path(sys.argv[1]), float(sys.argv[2])  # files written since `since` are this command's
print("\n==== GPU checks: summary ====")
lines = [("what", "img/s", "ms/step", "x ref", "loader/step", "peak GiB", "GPU %", "W")]
def load(f):
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        print(f"{f.name}: unreadable ({e})")
        return {"rows": [], "device": {}, "torch": "?"}


cut = []  # the files of runs stopped before their last row ("complete": false; none before 2026-11-30 had it)
def mark(f, res):
    """' *' after a row of a cut run's file (its rows measured, but the run is not whole), else ''."""
    if res.get("complete") is not False:
        return ""
    if f.name not in cut:
        cut.append(f.name)
    return " *"


for f in sorted(out.glob("throughput-*.json")):
    res = load(f)
    for r in res["rows"]:
        what = f"{f.stem[11:]}: {r['name']}{mark(f, res)}"
        if r.get("img_per_s") is None:
            lines.append((what, "failed: " + str(r.get("error", ""))[:60], *[""] * 6))
            continue
        fmt = lambda k, s: (s if callable(s) else s.format)(r[k]) if r.get(k) is not None else ""  # noqa: E731
        lines.append((what, fmt("img_per_s", "{:,.0f}"), fmt("ms_per_step", ms_text),
                      fmt("vs_reference", "{:.2f}"), fmt("loader_over_step", "{:.2f}"), fmt("peak_mem_gib", "{:.1f}"),
                      fmt("gpu_util_pct", "{:.0f}"), fmt("gpu_power_w", "{:.0f}")))
    dev = res["device"].get("name", "?")
    print(f"{f.name}: {dev}, torch {res['torch']}")
w = [max(len(x[i]) for x in lines) for i in range(len(lines[0]))]
for x in lines:
    print("  ".join(v.ljust(w[i]) if i == 0 else v.rjust(w[i]) for i, v in enumerate(x)))
print("x ref: a training row against the run's reference row with the same BN (split BN; +noshuffle rows: plain BN)")
print("loader/step: a loader row's img/s over its run's fastest step row (trainer or reference), not a speed-up")
m = out / "momentum.json"
res = load(m) if m.exists() else {}
if res.get("rows"):
    dev = res["device"] if isinstance(res["device"], str) else res["device"].get("name", "?")  # a string before 2026-11-28
    print(f"\nmomentum update, {res['tensors']} tensors, {res['numel'] / 1e6:.1f} M parameters on {dev}:")
    for r in res["rows"]:
        got = f"{r['ms']:.3f} ms, {r['gb_per_s']:.0f} GB/s" if r.get("ms") is not None else f"failed: {r.get('error')}"
        print(f"  {r['name']:<24} {got}")
# fp16 first (the default, and the reference's dtype), then bf16: the files' name order put bf16 first
for f in sorted(out.glob("split-bn-*.json"), key=lambda f: (f.stem != "split-bn-fp16", f.stem)):
    res = load(f)
    if not res.get("rows"):
        continue
    c, plain = res["config"], res["total_ms"].get("plain")
    print(f"\nsplit BN, {res['layers']} BN layers forward + backward, {c['arch']} batch {c['batch_size']}, "
          f"{c['splits']} splits, {c['dtype']}{' channels-last' if c['channels_last'] else ' NCHW'}, on {res['device'].get('name', '?')}:")
    for n, ms in res["total_ms"].items():
        got = "failed" if ms is None else f"{ms:.2f} ms/step" + (f", {ms / plain:.2f}x plain" if plain else "")
        print(f"  {n:<10} {got}")
    for e in res["errors"]:
        print(f"  failed: {e}")
# The issues' ratios, each measured within one run: loader-fed step against the synthetic-input step
# (issue 3: DALI >= 95%), and the FFCV device augmentation pass against the ResNet-50 step (issue 4: < 5%).
print("\nratios:")
steps = {}  # a trainer row's ms/step, and whether this command wrote its file
for f in sorted(out.glob("throughput-*.json")):
    rows = {r["name"]: r for r in load(f)["rows"] if r.get("img_per_s")}
    new = f.stat().st_mtime >= since
    steps.update({f"{f.stem[11:]}: {k}": (v["ms_per_step"], new) for k, v in rows.items() if k.startswith("trainer")})
    for name, r in rows.items():
        if name.startswith("end-to-end"):
            t = rows.get(name.replace("end-to-end", "trainer", 1))
            if t:
                print(f"  {f.stem[11:]}: {name} = {100 * r['img_per_s'] / t['img_per_s']:.1f}% of {t['name']}")
ff = out / "ffcv.json"
if ff.exists():
    res = load(ff)
    # One ResNet-50 b256 step to set each augmentation row against, not one line a step found: throughput's
    # rows (command 1) or e2e's (command 2), those of ffcv.json's own command first (this one's, or the
    # earlier ones' where ffcv.json is older), as $OUT may hold an earlier command's files
    new = ff.stat().st_mtime >= since
    found = [k for k in ("synthetic: trainer:bf16", "synthetic: trainer:fp16", "torch: trainer") if k in steps]
    k = min(found, key=lambda k: steps[k][1] != new, default=None)  # the first of the same command
    for r in res["rows"]:
        if k and r.get("row", "").startswith("aug") and r.get("ms_per_batch"):
            ms = steps[k][0]
            print(f"  ffcv {r['row']}{mark(ff, res)}: {r['ms_per_batch']:.2f} ms = {100 * r['ms_per_batch'] / ms:.1f}% "
                  f"of the {k.split(': ')[1]} step ({ms:.1f} ms); {r['img_per_s']:,.0f} img/s")
lc = out / "lincls.json"
if lc.exists():
    r = load(lc)
    if "top1" in r:
        best = f"; best {r['best_top1']:.2f}% at epoch {r['best_epoch']}" if "best_epoch" in r else ""
        print(f"\nlincls (CIFAR-10 checkpoint): top-1 {r['top1']:.2f}% after {len(r['history'])} epochs{best}, "
              f"{r['wall_s']:.0f} s on {r['device']}")
for f in sorted(out.glob("throughput-*.json")):
    for r in load(f)["rows"]:
        p = r.get("profile")
        if p and "error" in p:
            print(f"\nprofile of {r['name']}: none ({p['error']})")
        elif p:
            gaps = p.get("gaps_ms_per_step")  # None on a CPU (a dry run): its busy time is the ops' own
            print(f"\nprofile of {r['name']}: wall {p['wall_ms_per_step']:.1f} ms/step, busy {p['busy_ms_per_step']:.1f}"
                  + ("" if gaps is None else f", gaps {gaps:.1f}"))
            print("  phases: " + ", ".join(f"{k} {v:.2f}" for k, v in p["phases_ms"].items()))
            print("  kernels: " + ", ".join(f"{k} {v:.2f}" for k, v in p["kernels_ms"].items()))
if cut:
    print(f"\n*: a row of a run stopped before its last row (\"complete\": false in {', '.join(cut)}): "
          "its rows are not all there")
EOF
echo
printf '%s\n' "${STATUS[@]}" | tee -a "$LOG"
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
