#!/usr/bin/env bash
# Quickstart, offline: DeiT-tiny (dim 192, depth 12, 3 heads) at 32 px with patch 4 (8x8 = 64 tokens),
# trained twice with the same seed, without and with ToE (r1=0.5, ng=3, k=2), then both runs' accuracy,
# training img/s (log.txt), GFLOPs and training-step time are printed side by side
# (scripts/quickstart_report.py). The speed ratio comes from the step times: both runs' training steps
# timed again in one process, interleaved, median after warm-up, with the process's CPU time on a CPU
# (epoch img/s on a shared machine vary too much from run to run to compare two runs by).
#
# Data: the synthetic FAKE set by default; CIFAR-10 when ${DATA:-data}/cifar-10-batches-py exists and a
# GPU is present (a CIFAR-10 epoch takes too long on a CPU). Force it with QS_DATA=cifar10 or QS_DATA=fake.
# Knobs (environment): EPOCHS (3), FAKE_SIZE (384), BATCH (32), DEVICE (auto), OUT (output/quickstart),
# PYTHON (python), DRY_RUN=1 (print the three commands, run nothing).
# ToE's 3 stages span max(EPOCHS, 3) epochs, so EPOCHS=1 or 2 stops early in the schedule (stage 1 keeps
# half of the tokens) instead of failing.
# A short schedule uses light augmentation (no mixup/cutmix/RandAugment/erasing) so 3 epochs learn
# something; the full DeiT recipe is main.py's default.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data}
EPOCHS=${EPOCHS:-3}
FAKE_SIZE=${FAKE_SIZE:-384}
BATCH=${BATCH:-32}
OUT=${OUT:-output/quickstart}
PY=${PYTHON:-python}
for _v in EPOCHS FAKE_SIZE BATCH; do
    if ! [[ "${!_v}" =~ ^[0-9]+$ && "${!_v}" -ge 1 ]]; then
        echo "error: $_v must be a positive integer, got '${!_v}'" >&2; exit 2
    fi
done
TOE_EPOCHS=$(( EPOCHS < 3 ? 3 : EPOCHS ))  # the schedule needs at least one epoch per stage (ng = 3)

DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
    HAS_GPU=0  # DRY_RUN=1 prints the three commands (CPU unless DEVICE is set) and runs nothing
else
    HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
fi
DEVICE=${DEVICE:-$([ "$HAS_GPU" = 1 ] && echo cuda || echo cpu)}
# on a CPU, loader worker processes only compete with the model for the cores
WORKERS=${WORKERS:-$([ "$DEVICE" = cuda ] && echo 4 || echo 0)}
QS_DATA=${QS_DATA:-auto}
case "$QS_DATA" in auto|fake|cifar10) ;; *) echo "error: QS_DATA must be auto, fake or cifar10, got '$QS_DATA'" >&2; exit 2 ;; esac
if [ "$QS_DATA" = auto ]; then
    if [ -d "$DATA/cifar-10-batches-py" ] && [ "$DEVICE" = cuda ]; then QS_DATA=cifar10; else QS_DATA=fake; fi
fi
if [ "$QS_DATA" = cifar10 ]; then
    DATASET=(--data-set CIFAR10 --data-path "$DATA")
else
    DATASET=(--data-set FAKE --fake-size "$FAKE_SIZE" --nb-classes 10)
fi

COMMON=(--model deit_tiny_patch16_224 --input-size 32 --patch-size 4 --batch-size "$BATCH"
        --epochs "$EPOCHS" --unscale-lr --lr 1e-3 --warmup-epochs 0 --min-lr 1e-5 --drop-path 0.0
        --mixup 0 --cutmix 0 --aa none --reprob 0 --smoothing 0.1 --no-model-ema
        --num_workers "$WORKERS" --device "$DEVICE" --seed 0 --print-freq 4 --overwrite)

BASELINE=("$PY" main.py "${COMMON[@]}" "${DATASET[@]}" --output_dir "$OUT/baseline")
WITH_TOE=("$PY" main.py "${COMMON[@]}" "${DATASET[@]}" --toe-r1 0.5 --toe-ng 3 --toe-k 2 --toe-epochs "$TOE_EPOCHS"
          --output_dir "$OUT/toe")
REPORT=("$PY" scripts/quickstart_report.py "$OUT")
if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "${BASELINE[@]}"; echo
    printf '%q ' "${WITH_TOE[@]}"; echo
    printf '%q ' "${REPORT[@]}"; echo
    exit 0
fi

echo "== quickstart: DeiT-tiny 32px/patch 4, $EPOCHS epochs on ${DATASET[1]}, device $DEVICE"
echo "== [1/2] baseline (all tokens) -> $OUT/baseline"
"${BASELINE[@]}"
echo "== [2/2] ToE r1=0.5 ng=3 k=2 -> $OUT/toe"
"${WITH_TOE[@]}"
echo "== step time: both runs' training steps, timed interleaved in one process"
"${REPORT[@]}"
