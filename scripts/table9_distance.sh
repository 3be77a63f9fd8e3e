#!/usr/bin/env bash
# Table 9 of the ToE paper: the feature-distribution distance of Eq. 3, DeiT-tiny and DeiT-small on
# ImageNet-1K, ToE r1 = 0.5 (r0 = 0.25, Ng = 3, k = 2, block 1): Manhattan, Euclidean, and cosine
# (the default: Table 2's runs).
#   recipe: DeiT's (common.sh), 300 epochs, global batch 1024.
#   Paper: prints no times; about 2 x 44.2 h (tiny) + 2 x 102.2 h (small) = ~293 GPU hours for the new runs.
# Usage: DATA=/imagenet OUT=runs bash scripts/table9_distance.sh ; python scripts/summarize.py "$OUT" --tables 9
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_data /path/to/imagenet "the ImageNet root (train/ and val/ class folders)"

for size in tiny small; do
    deit_toe_default "$size" 0.5
    for distance in manhattan euclidean; do
        toe_args 0.5 --toe-distance "$distance"
        deit_run table9 "deit_${size}_$distance" "deit_${size}_patch16_224" "${TOE_ARGS[@]}"
    done
done

smoke_flush
