#!/usr/bin/env bash
# Table 6 of the ToE paper: DeiT-tiny on ImageNet-1K, sensitivity to ToE's speedup factors, one factor at a
# time from the default r0/r1 = 1/2, Ng = 3, k = 2 (r1 = 0.5): r0/r1 in {1/3, 2/3}, Ng in {2, 4}, k in {1, 3}.
# Plus Fig. 4 (acceleration vs top-1 over r1): DeiT-tiny ToE with r1 in FIG4_R1 (default "0.4 0.6", the
# paper's other settings; r1 = 0.5 and the baseline are Table 2's runs). FIG4_R1="" skips them.
#   recipe: DeiT's (common.sh), 300 epochs, global batch 1024; every run changes one ToE flag only.
#   shared: the default column is Table 2's deit_tiny_toe_r1_0.5 run (OUT/table2; trained here if missing).
#   Paper: "about 44 GPU hours" per column (caption) -> ~264 GPU hours for the six new runs (+ ~2 x 44 h for
#   Fig. 4's two r1 values; the paper prints no times for them).
# Usage: DATA=/imagenet OUT=runs bash scripts/table6_hparams.sh ; python scripts/summarize.py "$OUT" --tables 6
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_data /path/to/imagenet "the ImageNet root (train/ and val/ class folders)"
FIG4_R1="${FIG4_R1-0.4 0.6}"
tiny=deit_tiny_patch16_224

deit_toe_default tiny 0.5                                   # default (Table 2's run)
toe_args 0.5 --toe-r0 0.16666667; deit_run table6 r0_over_r1_1_3 "$tiny" "${TOE_ARGS[@]}"   # r0 = r1/3
toe_args 0.5 --toe-r0 0.33333333; deit_run table6 r0_over_r1_2_3 "$tiny" "${TOE_ARGS[@]}"   # r0 = 2 r1/3
toe_args 0.5 --toe-ng 2;          deit_run table6 ng_2 "$tiny" "${TOE_ARGS[@]}"
toe_args 0.5 --toe-ng 4;          deit_run table6 ng_4 "$tiny" "${TOE_ARGS[@]}"
toe_args 0.5 --toe-k 1;           deit_run table6 k_1 "$tiny" "${TOE_ARGS[@]}"
toe_args 0.5 --toe-k 3;           deit_run table6 k_3 "$tiny" "${TOE_ARGS[@]}"

deit_baseline tiny                                          # Fig. 4's 1.0x point (Table 2's run)
for r1 in $FIG4_R1; do
    toe_args "$r1"; deit_run table6 "fig4_r1_$r1" "$tiny" "${TOE_ARGS[@]}"
done

smoke_flush
