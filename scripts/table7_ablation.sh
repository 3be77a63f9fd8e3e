#!/usr/bin/env bash
# Table 7 of the ToE paper: the "initialization-expansion-merge" pipeline, DeiT-tiny and DeiT-small on
# ImageNet-1K, ToE r1 = 0.5 (r0 = 0.25, Ng = 3, k = 2, block 1, cosine). The paper's four rows:
#   1. spatial init + expansion + merge      (the default: Table 2's runs, OUT/table2)
#   2. random init, no expansion, merge      (--toe-init random --toe-no-expand), 3 runs: seeds 0, 1, 2
#                                            (the paper prints mean +- std of 3 runs)
#   3. spatial init, no expansion, merge     (--toe-no-expand)
#   4. spatial init + expansion, no merge    (--toe-no-merge)
#   recipe: DeiT's (common.sh), 300 epochs, global batch 1024.
#   Paper: prints no times; about 5 x 44.2 h (tiny) + 5 x 102.2 h (small) = ~732 GPU hours for the new runs.
# Usage: DATA=/imagenet OUT=runs bash scripts/table7_ablation.sh ; python scripts/summarize.py "$OUT" --tables 7
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_data /path/to/imagenet "the ImageNet root (train/ and val/ class folders)"

for size in tiny small; do
    model="deit_${size}_patch16_224"
    deit_toe_default "$size" 0.5
    for seed in 0 1 2; do
        toe_args 0.5 --toe-init random --toe-no-expand
        deit_run table7 "deit_${size}_random_noexpand_seed$seed" "$model" "${TOE_ARGS[@]}" --seed "$seed"
    done
    toe_args 0.5 --toe-no-expand; deit_run table7 "deit_${size}_spatial_noexpand" "$model" "${TOE_ARGS[@]}"
    toe_args 0.5 --toe-no-merge;  deit_run table7 "deit_${size}_spatial_expand_nomerge" "$model" "${TOE_ARGS[@]}"
done

smoke_flush
