#!/usr/bin/env bash
# Table 9 of the ToE paper: the feature-distribution distance of Eq. 3, DeiT-tiny and DeiT-small on
# ImageNet-1K, ToE r1 = 0.5 (r0 = 0.25, Ng = 3, k = 2, block 1): Manhattan, Euclidean and cosine, each in two
# variants:
#   --toe-compat none      the paper's equations (cosine: Table 2's default run, OUT/table2);
#                          runs deit_<size>_<distance>
#   --toe-compat official  the official ToE code's behaviour (its max-distance rule for Euclidean/Manhattan,
#                          its seeds and counts), with which the published Table 9 was trained;
#                          runs deit_<size>_<distance>_official
# summarize.py prints both as two labelled rows per distance, the paper's numbers next to the official rows.
#   recipe: DeiT's (common.sh), 300 epochs, global batch 1024.
#   Paper: prints no times; about 5 x 44.2 h (tiny) + 5 x 102.2 h (small) = ~732 GPU hours for the new runs.
# Usage: DATA=/imagenet OUT=runs bash scripts/table9_distance.sh ; python scripts/summarize.py "$OUT" --tables 9
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_data /path/to/imagenet "the ImageNet root (train/ and val/ class folders)"

for size in tiny small; do
    for distance in cosine manhattan euclidean; do
        for compat in none official; do
            if [[ "$distance" == cosine && "$compat" == none ]]; then
                deit_toe_default "$size" 0.5
                continue
            fi
            toe_args 0.5 --toe-distance "$distance" --toe-compat "$compat"
            deit_run table9 "deit_${size}_$distance$(compat_suffix "$compat")" "deit_${size}_patch16_224" \
                "${TOE_ARGS[@]}"
        done
    done
done

smoke_flush
