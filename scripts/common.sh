# shellcheck shell=bash
# Shared launcher for the scripts/table*.sh reproduction scripts. Source it; do not run it.
#
# Environment (every table script):
#   DATA               data root: ImageNet (train/ val/) for Tables 2,3,6-9; the CIFAR root for Table 5.
#                      Required, except with DRY_RUN=1 (placeholder) and SMOKE=1 (synthetic data).
#   OUT                output root (default ./runs); run <name> of table <t> writes OUT/table<t>/<name>/.
#                      With NNODES > 1 it must be one shared folder that every node sees.
#   NGPUS              GPUs per node (default 4).      NNODES      nodes (default 1).
#   NODE_RANK          this node's own rank: 0 on the node at MASTER_ADDR, 1 .. NNODES-1 on the others
#                      (default 0). Every node runs the same script with its own NODE_RANK.
#   MASTER_ADDR        address of the NODE_RANK=0 node (default 127.0.0.1; required when NNODES > 1).
#   MASTER_PORT        rendezvous port (default 29500).
#   MAX_BATCH_PER_GPU  largest per-GPU micro-batch (default 256). The paper's global batch (1024; 768 for the
#                      CIFAR fine-tuning) is kept: per-GPU batch = global / (NGPUS x NNODES), which must be a
#                      whole number, split into --grad-accum-steps micro-batches above MAX_BATCH_PER_GPU.
#   AMP                --amp of every run (default fp16: DeiT and LV-ViT trained with fp16 autocast;
#                      bf16 is the safer choice on A100/H100).
#   WORKERS            data-loader workers per GPU (default 10, DeiT's).
#   TOE_COMPAT         none or official: --toe-compat of the runs that reproduce tables published with the
#                      official ToE code (Table 2's DeiT-base r1 = 0.4 row, Table 3's and Table 4's ToE runs:
#                      default official); official runs write to <name>_official. none runs the paper's
#                      equations. Table 9 always runs both.
#   ONLY               bash regex; only runs whose "table<t>/<name>" matches are launched.
#   PYTHON             python interpreter (default python).  TORCHRUN  launcher (default torchrun).
# Modes:
#   DRY_RUN=1  print every command (shell-quoted, one per line) and run nothing.
#   SMOKE=1    run every command for one epoch on CPU with a tiny model (img 32, patch 4, depth 4, dim 32),
#              on FAKE images (or tiny self-made CIFAR / ImageFolder + label maps where the table needs
#              them), all in one python process per script: proves every flag parses and runs.
# A run whose log.txt already holds its last epoch is skipped, so a script can be re-run to resume; an
# interrupted run resumes from its checkpoint.pth (main.py's --resume auto). With several nodes each node
# decides from the shared OUT, so all of them skip or launch the same runs.
# Runs shared by several tables (e.g. DeiT-tiny ToE r1=0.5 is Table 2's row, Table 6's default, Table 7's
# first row, Table 8's layer 1 and Table 9's cosine) always write to the same folder, so they train once.

set -euo pipefail

TOE_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TOE_REPO

die() { echo "error: $*" >&2; exit 2; }
_show() { local s; s=$(printf '%q ' "$@"); printf '%s\n' "${s% }"; }  # one shell-quoted command line

DRY_RUN="${DRY_RUN:-0}"
SMOKE="${SMOKE:-0}"
NGPUS="${NGPUS:-4}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_BATCH_PER_GPU="${MAX_BATCH_PER_GPU:-256}"
AMP="${AMP:-fp16}"
WORKERS="${WORKERS:-10}"
ONLY="${ONLY:-}"
PYTHON="${PYTHON:-python}"
TORCHRUN="${TORCHRUN:-torchrun}"
OUT="${OUT:-runs}"
TOE_COMPAT_GIVEN="${TOE_COMPAT:-}"  # empty: each script's own default (toe_compat_or)
TOE_COMPAT="${TOE_COMPAT:-none}"

for _v in NGPUS NNODES MAX_BATCH_PER_GPU MASTER_PORT; do
    [[ "${!_v}" =~ ^[0-9]+$ && "${!_v}" -ge 1 ]] || die "$_v must be a positive integer, got '${!_v}'"
done
[[ "$WORKERS" =~ ^[0-9]+$ ]] || die "WORKERS must be an integer >= 0, got '$WORKERS'"
[[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK must be in [0, NNODES-1], got '$NODE_RANK'"
[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
[[ "$SMOKE" == 0 || "$SMOKE" == 1 ]] || die "SMOKE must be 0 or 1, got '$SMOKE'"
case "$AMP" in fp16|bf16|none) ;; *) die "AMP must be fp16, bf16 or none, got '$AMP'" ;; esac
case "$TOE_COMPAT" in none|official) ;; *) die "TOE_COMPAT must be none or official, got '$TOE_COMPAT'" ;; esac
if [[ "$NNODES" -gt 1 && "$SMOKE" == 0 && ( "$MASTER_ADDR" == 127.0.0.1 || "$MASTER_ADDR" == localhost ) ]]; then
    die "NNODES=$NNODES needs MASTER_ADDR, the address of the NODE_RANK=0 node (the same on every node)"
fi

_abspath() { if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "$1"; fi; }
OUT="$(_abspath "$OUT")"

# DATA: required for real runs; DRY_RUN shows a placeholder, SMOKE makes its own data.
require_data() {  # $1: placeholder shown by DRY_RUN, $2: what DATA must hold
    if [[ -n "${DATA:-}" ]]; then
        DATA="$(_abspath "$DATA")"
        if [[ "$DRY_RUN" == 0 && "$SMOKE" == 0 && ! -d "$DATA" ]]; then die "DATA=$DATA is not a folder"; fi
    elif [[ "$DRY_RUN" == 1 || "$SMOKE" == 1 ]]; then
        DATA="$1"
    else
        die "set DATA to $2"
    fi
}

# ---------------------------------------------------------------------------------------------- batch
# batch_split GLOBAL RUN -> BATCH_PER_GPU, ACCUM_STEPS with BATCH_PER_GPU x ACCUM_STEPS x NGPUS x NNODES = GLOBAL
batch_split() {
    local global="$1" run="$2" world=$((NGPUS * NNODES)) per accum
    (( global % world == 0 )) || die "$run: its global batch $global is not divisible by NGPUS x NNODES = $NGPUS x $NNODES = $world GPUs; use a GPU count that divides $global"
    per=$((global / world))
    for ((accum = 1; accum <= per; accum++)); do
        if (( per % accum == 0 && per / accum <= MAX_BATCH_PER_GPU )); then
            BATCH_PER_GPU=$((per / accum)); ACCUM_STEPS=$accum; return 0
        fi
    done
    die "$run: cannot split global batch $global over $world GPUs"
}

# ---------------------------------------------------------------------------------------------- smoke
SMOKE_QUEUE=""
SMOKE_MODEL_KWARGS="depth=4 embed_dim=32 num_heads=2"
SMOKE_DATA_ARGS=(--data-set FAKE --fake-size 16 --nb-classes 10)  # a table may replace (own data)
# SMOKE_DEFER=DIR (SMOKE=1 only): queue the commands in DIR instead of running them at the end of the script,
# so that several scripts share one python process (CI): run the queue later with
#   SMOKE=1 SMOKE_DEFER=DIR bash -c 'source scripts/common.sh && smoke_flush now'
SMOKE_DEFER="${SMOKE_DEFER:-}"
if [[ "$SMOKE" == 1 && -n "$SMOKE_DEFER" ]]; then
    SMOKE_QUEUE="$(_abspath "$SMOKE_DEFER")"
    mkdir -p "$SMOKE_QUEUE"
elif [[ "$SMOKE" == 1 ]]; then
    SMOKE_QUEUE="$(mktemp -d "${TMPDIR:-/tmp}/toe_smoke.XXXXXX")"
    trap 'rm -rf "$SMOKE_QUEUE"' EXIT
fi

# smoke_overrides: appended after the paper's flags; launch keeps each flag once, with the later value.
smoke_overrides() {
    SMOKE_ARGS=(--device cpu --amp none --epochs "${SMOKE_EPOCHS:-1}" --input-size 32 --patch-size 4
                --model-kwargs $SMOKE_MODEL_KWARGS --warmup-epochs 0 --num_workers 0 --print-freq 1000
                "${SMOKE_DATA_ARGS[@]}")
}

_queue() {  # _queue KIND NAME ARGS... : one NUL-separated entry per command, run in order by smoke_flush
    local n
    n=$(find "$SMOKE_QUEUE" -name '*.cmd' | wc -l)
    printf '%s\0' "$@" > "$SMOKE_QUEUE/$(printf '%05d' "$n").cmd"
}

# run_script NAME SCRIPT ARGS... : a helper python script (e.g. scripts/generate_label.py), run from the
# repository root (queued with the training runs under SMOKE=1)
run_script() {
    local name="$1"; shift
    if [[ "$DRY_RUN" == 1 ]]; then _show "$PYTHON" "$@"; return 0; fi
    if [[ "$SMOKE" == 1 ]]; then
        printf '[smoke] %s: ' "$name"; _show python "$@"
        _queue script "$name" "$@"; return 0
    fi
    (cd "$TOE_REPO" && "$PYTHON" "$@")
}

# smoke_flush [now]: run the queued commands in order in one python process (one torch import for the
# whole script); with SMOKE_DEFER only when called as `smoke_flush now`. A training run whose log.txt already
# holds its last epoch (e.g. a run shared with an earlier script of the same queue) is skipped.
smoke_flush() {
    [[ "$SMOKE" == 1 ]] || return 0
    if [[ -n "$SMOKE_DEFER" && "${1:-}" != now ]]; then
        echo "# queued in $SMOKE_QUEUE (SMOKE_DEFER): run later with smoke_flush now"
        return 0
    fi
    # one thread: tiny models gain nothing from more, and a busy CI machine makes thread syncs very slow
    (cd "$TOE_REPO" && OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PYTHON" - "$SMOKE_QUEUE" <<'PY'
import os, runpy, sys, time, traceback
queue = sys.argv[1]
sys.path.insert(0, os.getcwd())
import main  # noqa: E402  (the training entry, imported once)
from runtime import runlog  # noqa: E402


def last_value(argv, flag):
    vals = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == flag]
    return vals[-1] if vals else None


def complete(argv):
    rows = runlog.epoch_rows(os.path.join(last_value(argv, "--output_dir") or "", "log.txt"))
    return bool(rows) and rows[-1]["epoch"] >= int(last_value(argv, "--epochs") or 300) - 1


failed = []
for entry in sorted(f for f in os.listdir(queue) if f.endswith(".cmd")):
    with open(os.path.join(queue, entry), "rb") as f:
        fields = f.read().decode().split("\0")[:-1]
    kind, name, argv = fields[0], fields[1], fields[2:]
    if kind == "main" and complete(argv):
        print(f"[smoke] {name}: complete, skipped", flush=True)
        continue
    start = time.time()
    try:
        if kind == "main":
            sys.argv = ["main.py"] + argv
            rc = main.main(argv)
        else:
            sys.argv = list(argv)
            try:
                runpy.run_path(argv[0], run_name="__main__")
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:
        traceback.print_exc()
        rc = 1
    print(f"[smoke] {name}: exit {rc} in {time.time() - start:.1f}s", flush=True)
    if rc:
        failed.append(name)  # keep going: one report of every failing command
if failed:
    print(f"[smoke] FAILED: {' '.join(failed)}", file=sys.stderr, flush=True)
sys.exit(1 if failed else 0)
PY
    )
}

# smoke data makers (numpy + PIL only; fast)
smoke_make_imagefolder() {  # DIR CLASSES TRAIN_PER_CLASS VAL_PER_CLASS SIZE
    "$PYTHON" - "$@" <<'PY'
import os, sys
import numpy as np
from PIL import Image
root, classes, ntrain, nval, size = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
for split, n in (("train", ntrain), ("val", nval)):
    for c in range(classes):
        d = os.path.join(root, split, f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img[..., c % 3] = 64 * (c + 1) % 256  # class-dependent colour
            Image.fromarray(img).save(os.path.join(d, f"img{i}.png"))
PY
}

smoke_make_cifar() {  # ROOT: tiny CIFAR-10 and CIFAR-100 in torchvision's python layout
    "$PYTHON" - "$1" <<'PY'
import os, pickle, sys
import numpy as np
root = sys.argv[1]
rng = np.random.default_rng(0)
def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
for folder, files, meta, key, labels, n_cls in (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta",
         "label_names", "labels", 10),
        ("cifar-100-python", ["train", "test"], "meta", "fine_label_names", "fine_labels", 100)):
    d = os.path.join(root, folder)
    os.makedirs(d, exist_ok=True)
    for name in files:
        n = 16 if "test" in name else 32 // (len(files) - 1)
        dump(os.path.join(d, name), {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                     labels: [int(x) for x in rng.integers(0, n_cls, n)]})
    dump(os.path.join(d, meta), {key: [f"c{i}" for i in range(n_cls)]})
PY
}

# ---------------------------------------------------------------------------------------------- launch
# run_complete DIR EPOCHS: true when DIR/log.txt holds the metrics of epoch EPOCHS-1 (runlog.epoch_rows: notice
# rows such as a resume under changed flags do not count)
run_complete() {
    [[ -f "$1/log.txt" ]] || return 1
    (cd "$TOE_REPO" && "$PYTHON" -c 'import sys; from runtime import runlog
rows = runlog.epoch_rows(sys.argv[1])
sys.exit(0 if rows and rows[-1]["epoch"] >= int(sys.argv[2]) - 1 else 1)' "$1/log.txt" "$2")
}

# _merge_flags ARGS... -> MERGED: each --flag once, at its first position, with the value(s) of its last
# occurrence, so that a later flag (a table's ablation, SMOKE's overrides) replaces a recipe's instead of
# repeating it on the command line.
_merge_flags() {
    local -a order=() values=()
    local -A val=()
    local flag
    while (($#)); do
        flag="$1"; shift
        values=()
        while (($#)) && [[ "$1" != --* ]]; do values+=("$1"); shift; done
        [[ -n "${val[$flag]+set}" ]] || order+=("$flag")
        val[$flag]=""
        if ((${#values[@]})); then printf -v "val[$flag]" '%q ' "${values[@]}"; fi
    done
    MERGED=()
    for flag in "${order[@]}"; do MERGED+=("$flag"); eval "MERGED+=(${val[$flag]})"; done
}

# launch TABLE NAME GLOBAL_BATCH ARGS... : one training run of main.py into OUT/TABLE/NAME.
launch() {
    local table="$1" name="$2" global="$3"; shift 3
    local dir="$OUT/$table/$name" epochs=300 i args=("$@")
    if [[ -n "$ONLY" && ! "$table/$name" =~ $ONLY ]]; then return 0; fi
    for ((i = 0; i < ${#args[@]} - 1; i++)); do
        if [[ "${args[$i]}" == --epochs ]]; then epochs="${args[$((i + 1))]}"; fi
    done
    if [[ " ${args[*]} " == *" --toe-r1 "* ]]; then  # the stages span the run (SMOKE: 4 epochs, so 1 is stage 1)
        args+=(--toe-epochs "$([[ "$SMOKE" == 1 ]] && echo 4 || echo "$epochs")")
    fi
    if [[ "$SMOKE" == 1 ]]; then
        epochs="${SMOKE_EPOCHS:-1}"  # 1, or what a run needs at least (e.g. a curriculum: one per phase)
        smoke_overrides
        args+=("${SMOKE_ARGS[@]}" --batch-size 8 --grad-accum-steps 1 --output_dir "$dir")
    else
        batch_split "$global" "$table/$name"
        args+=(--batch-size "$BATCH_PER_GPU" --grad-accum-steps "$ACCUM_STEPS" --output_dir "$dir")
    fi
    _merge_flags "${args[@]}"
    args=("${MERGED[@]}")
    if [[ " ${args[*]} " == *" --train-cooldown "* ]]; then  # the run also logs timm's cool-down epochs
        local cool=10
        for ((i = 0; i < ${#args[@]} - 1; i++)); do
            if [[ "${args[$i]}" == --cooldown-epochs ]]; then cool="${args[$((i + 1))]}"; fi
        done
        epochs=$((epochs + cool))
    fi
    # every node reads the same log.txt in the shared OUT, so all nodes skip (or launch) together
    if [[ "$DRY_RUN" == 0 ]] && run_complete "$dir" "$epochs"; then
        echo "# $table/$name: complete ($epochs epochs in $dir/log.txt), skipped"
        return 0
    fi
    if [[ "$SMOKE" == 1 ]]; then
        printf '[smoke] %s/%s: ' "$table" "$name"; _show python main.py "${args[@]}"
        mkdir -p "$dir"
        _queue main "$table/$name" "${args[@]}"
        return 0
    fi
    local cmd=("$TORCHRUN" --nproc_per_node "$NGPUS" --nnodes "$NNODES" --node_rank "$NODE_RANK"
               --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" main.py "${args[@]}")
    if [[ "$DRY_RUN" == 1 ]]; then _show "${cmd[@]}"; return 0; fi
    mkdir -p "$dir"
    _show "${cmd[@]}" > "$dir/command.sh"
    echo "# $table/$name -> $dir"
    (cd "$TOE_REPO" && "${cmd[@]}")
}

# ---------------------------------------------------------------------------------------------- recipes
# Every recipe hyper-parameter is on the command line. main.py flags the recipes leave at main.py's default
# act only where these recipes do not go: --lr-noise-pct/--lr-noise-std (no --lr-noise), --teacher-* and
# --distillation-alpha/-tau (--distillation-type none); and the switches that are off unless given, which no
# recipe gives: --clip-grad, --opt-betas (the optimizer's own), --bce-loss, --ThreeAugment, --src, --resplit,
# --cutmix-minmax, --lr-noise, --attn-only, --toe-stage-epochs, --toe-sparse-eval.

# DeiT's ImageNet recipe (Touvron et al. 2021, the official repo's defaults):
# 300 epochs, AdamW lr 5e-4 per 512 images (main.py scales it: 5e-4 x 1024/512 = 1e-3 at batch 1024),
# wd 0.05, cosine, 5 warm-up epochs from 1e-6, min lr 1e-5, label smoothing 0.1, drop path 0.1,
# RandAugment m9, colour jitter 0.3, random erasing 0.25, mixup 0.8 / cutmix 1.0, repeated augmentation
# (3 repeats), EMA kept with decay 0.99996 (DeiT's default; the reported top-1 is the model's own, not EMA's).
deit_imagenet_args() {
    deit_recipe_args 0.25 0.1
    DEIT_ARGS=(--data-set IMNET --data-path "$DATA" --input-size 224 --epochs 300
               --opt adamw --opt-eps 1e-8 --weight-decay 0.05 --momentum 0.9
               --sched cosine --lr 5e-4 "${DEIT_RECIPE_ARGS[@]}")
}

# deit_recipe_args REPROB DROP_PATH: DeiT's schedule shape, regularisation, augmentation, EMA and evaluation
# flags, shared by ImageNet training (random erasing 0.25, drop path 0.1) and CIFAR fine-tuning (DeiT's
# transfer recipe turns both off: 0 0). Sets DEIT_RECIPE_ARGS.
deit_recipe_args() {
    local reprob="$1" drop_path="$2"
    DEIT_RECIPE_ARGS=(--warmup-lr 1e-6 --min-lr 1e-5 --warmup-epochs 5 --cooldown-epochs 10
               --decay-rate 0.1 --decay-epochs 30 --patience-epochs 10 --drop 0.0 --drop-path "$drop_path"
               --color-jitter 0.3 --aa rand-m9-mstd0.5-inc1 --smoothing 0.1 --train-interpolation bicubic
               --train-mode --reprob "$reprob" --remode pixel --recount 1 --repeated-aug --ra-reps 3
               --curriculum none
               --mixup 0.8 --cutmix 1.0 --mixup-prob 1.0 --mixup-switch-prob 0.5 --mixup-mode batch
               --distillation-type none --model-ema --model-ema-decay 0.99996
               --eval-crop-ratio 0.875 --dist-eval --amp "$AMP" --num_workers "$WORKERS" --pin-mem --seed 0)
}

# toe_args R1 [flag value ...]: the paper's ToE defaults (r0 = r1/2, Ng 3, k 2, block 1, cosine, spatial
# init, expansion and merging on, the paper's equations: --toe-compat none), each spelled out; later flags
# replace them (launch keeps each flag once). --toe-epochs (the span of the stages) is added by launch.
toe_args() {
    local r1="$1"; shift
    local r0
    r0=$(awk -v r="$r1" 'BEGIN { printf "%.8g", r / 2 }')
    TOE_ARGS=(--toe-r1 "$r1" --toe-r0 "$r0" --toe-ng 3 --toe-k 2 --toe-layer 1 --toe-distance cosine
              --toe-init spatial --toe-compat none "$@")
}

# DeiT on ImageNet at global batch 1024: deit_run TABLE NAME MODEL [extra flags...]
deit_run() {
    local table="$1" name="$2" model="$3"; shift 3
    deit_imagenet_args
    launch "$table" "$name" 1024 --model "$model" "${DEIT_ARGS[@]}" "$@"
}

# toe_compat_or DEFAULT: TOE_COMPAT as the user set it, else the script's DEFAULT (printed)
toe_compat_or() { printf '%s' "${TOE_COMPAT_GIVEN:-$1}"; }

# compat_suffix COMPAT: the run-name suffix of a --toe-compat variant ("" for none, "_official")
compat_suffix() { [[ "$1" == none ]] || printf '_%s' "$1"; }

# The runs that several tables share, always in OUT/table2 (trained once, skipped when complete).
deit_baseline() { deit_run table2 "deit_$1_baseline" "deit_$1_patch16_224"; }
deit_toe_default() {  # deit_toe_default SIZE R1 [COMPAT (none)]
    local compat="${3:-none}"
    toe_args "$2" --toe-compat "$compat"
    deit_run table2 "deit_$1_toe_r1_$2$(compat_suffix "$compat")" "deit_$1_patch16_224" "${TOE_ARGS[@]}"
}
