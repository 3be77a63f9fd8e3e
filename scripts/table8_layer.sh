#!/usr/bin/env bash
# Table 8 of the ToE paper: where to apply ToE, DeiT-tiny on ImageNet-1K, ToE r1 = 0.5 (r0 = 0.25, Ng = 3,
# k = 2) on the output of the embedding (--toe-layer 0), of block 1 (1, the default: Table 2's run), of
# block 2 (2) and of block 3 (3). --toe-layer L reduces the input of blocks[L].
#   recipe: DeiT's (common.sh), 300 epochs, global batch 1024.
#   Paper: 43.5 + 45.2 + 46.9 = 135.6 GPU hours for the three new runs (44.2 h for the default).
# Usage: DATA=/imagenet OUT=runs bash scripts/table8_layer.sh ; python scripts/summarize.py "$OUT" --tables 8
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_data /path/to/imagenet "the ImageNet root (train/ and val/ class folders)"

deit_toe_default tiny 0.5
for layer in 0 2 3; do
    toe_args 0.5 --toe-layer "$layer"
    deit_run table8 "deit_tiny_layer$layer" deit_tiny_patch16_224 "${TOE_ARGS[@]}"
done

smoke_flush
