#!/usr/bin/env bash
# Table 4 of the ToE paper: EfficientTrain (Wang et al., ICCV 2023) and EfficientTrain + ToE on ImageNet-1K,
# DeiT-tiny and DeiT-small, each three ways:
#   deit_{tiny,small}_baseline                    EfficientTrain's recipe without its curriculum
#   deit_{tiny,small}_efficienttrain              + --curriculum efficienttrain
#   deit_{tiny,small}_efficienttrain_toe_r1_0.6   + ToE r1 = 0.6, r0 = 0.3, Ng = 3, k = 2, after block 1,
#                                                   stages starting at epochs 0/100/200, as the official ToE
#                                                   code selects tokens (--toe-compat official; the published
#                                                   numbers came from it). TOE_COMPAT=none runs the paper's
#                                                   equations instead (into ..._toe_r1_0.6, not ..._official).
#   recipe: the official EfficientTrain + ToE code's: DeiT's augmentation and regularisation (deit_imagenet_args
#           in common.sh) at global batch 4096 (kept through --grad-accum-steps on any GPU count),
#           lr 5e-4 x 4096/512 = 4e-3 (main.py scales --lr by global_batch/512), AdamW wd 0.05, clip-grad 5.0,
#           drop path 0.1, AMP, 300 epochs; no repeated augmentation and no EMA (both off in that code); the lr
#           stepped per iteration (--sched-on-updates): linear warm-up from 0 to the peak over 20 epochs, then
#           cosine over the remaining 280 epochs down to 1e-6 (its utils.cosine_scheduler).
#   curriculum: five equal phases of the epochs (60 each), training at 160, 160, 160, 192, 224 px with
#           RandAugment rand-m{1,3,5,7,9}-mstd0.5-inc1; the loader augments at 224 px and the device keeps the
#           lowest frequencies of each batch (--curriculum-downsample fourier, EfficientTrain's own method);
#           evaluation always at 224. ToE's stages run on top, so phases and stages interleave
#           (python -m toe.flops --curriculum efficienttrain counts the GFLOPs).
#   micro-batches: the curriculum runs pass --curriculum-batch-scale: where --grad-accum-steps >= 2, a 160 px
#           phase runs 2x micro-batches with half the steps (192 px: (224/192)^2 rounds to 1, unchanged; the
#           official code doubles it there too: a timing difference only, same global batch and update).
#   Paper: 407.2 GPU hours in total on 8 RTX A6000 (52.5/36.5/32.3 tiny, 121.3/85.2/79.4 small).
# Usage: DATA=/imagenet OUT=runs NGPUS=8 bash scripts/table4_efficienttrain.sh   (DRY_RUN=1 prints, SMOKE=1 tests)
# Then:  python scripts/summarize.py "$OUT" --tables 4
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_data /path/to/imagenet "the ImageNet root (train/ and val/ class folders)"

# SMOKE's ToE schedule spans 4 epochs (common.sh), so its stages start at 0/2/3, the same equal split.
if [[ "$SMOKE" == 1 ]]; then stage_epochs=(0 2 3); else stage_epochs=(0 100 200); fi
compat="$(toe_compat_or official)"

# efficienttrain_run NAME MODEL [extra flags...]: one run of EfficientTrain's DeiT recipe into OUT/table4/NAME
efficienttrain_run() {
    local name="$1" model="$2" arg skip=0; shift 2
    local -a recipe=()
    deit_imagenet_args
    for arg in "${DEIT_ARGS[@]}"; do  # repeated augmentation and EMA are off, their settings go with them
        if ((skip)); then skip=0; continue; fi
        case "$arg" in
            --repeated-aug) recipe+=(--no-repeated-aug) ;;
            --model-ema) recipe+=(--no-model-ema) ;;
            --ra-reps|--model-ema-decay) skip=1 ;;
            *) recipe+=("$arg") ;;
        esac
    done
    launch table4 "$name" 4096 --model "$model" "${recipe[@]}" --sched-on-updates --warmup-lr 0 --min-lr 1e-6 \
        --warmup-epochs 20 --clip-grad 5.0 "$@"
}

for size in tiny small; do
    model="deit_${size}_patch16_224"
    curriculum=(--curriculum efficienttrain --curriculum-downsample fourier --curriculum-batch-scale)
    efficienttrain_run "deit_${size}_baseline" "$model"
    # SMOKE: 5 epochs, one per curriculum phase (main.py refuses a curriculum that skips its final size)
    SMOKE_EPOCHS=5 efficienttrain_run "deit_${size}_efficienttrain" "$model" "${curriculum[@]}"
    toe_args 0.6 --toe-r0 0.3 --toe-stage-epochs "${stage_epochs[@]}" --toe-compat "$compat"
    SMOKE_EPOCHS=5 efficienttrain_run "deit_${size}_efficienttrain_toe_r1_0.6$(compat_suffix "$compat")" "$model" \
        "${curriculum[@]}" "${TOE_ARGS[@]}"
done

smoke_flush
