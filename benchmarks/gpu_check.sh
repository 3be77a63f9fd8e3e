#!/usr/bin/env bash
# One-GPU check of Token Expansion (issue 12): op and step benchmarks, short FAKE training runs (eager and
# torch.compile, ToE on and off, fp16), torchrun with --dist-eval, and the data-loader benchmark.
#
#   bash benchmarks/gpu_check.sh                     # needs CUDA; sized for a few minutes on one GPU
#   QUICK=1 bash benchmarks/gpu_check.sh             # DeiT-tiny only, fewer repetitions, smaller runs
#   DATA=/imagenet bash benchmarks/gpu_check.sh      # also bench_data.py on that folder (<DATA>/train/...)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh  # every part on CPU with tiny sizes (tests the script)
#
# Part 5 (issue 18) trains DeiT-tiny with ToE for 2 epochs with each --data-backend (pil, dali) on JPEGs: a
# link farm of DATA (else of the project's imagenette-mini-64, repeated) in OUT/backend_data, and reports each
# stage's train_img_per_s against bench_toe's model-only rate at that keep rate: below 80% = loader-bound.
# The dali run needs requirements-dali.txt; without it the part says so and is skipped.
#
# Part 6 (issue 24) decodes the same 256 JPEGs (of that folder's val/) with --data-backend dali's evaluation
# graph and with the PIL path's (python -m dali_loader.check_decode): on CUDA nvJPEG ("mixed", fancy chroma
# upsampling) and DALI's CPU decoder, at 224 px. It prints each mean |DALI - PIL| in 0-255 levels and fails
# when the DEVICE graph's is over DECODE_BOUND (default 1.0 level; DALI's CPU graph measures about 0.2).
#
# Settings (environment): OUT (default gpu_check_out) receives every log, summary.txt and summary.json;
# WORKERS loader workers of the training runs (default min(10, cores)); NPROC torchrun processes (default:
# the visible GPUs); PYTHON (default python). A failing part is reported and the others still run; the
# exit code is 1 if any part failed, 2 for bad settings or no CUDA device. DECODE_BOUND: part 6's bound.
set -euo pipefail

# The whole script is one function, read completely before it starts: editing this file while it runs
# (a long GPU run) cannot change what the running copy does.
main() {
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  DEVICE="${DEVICE:-cuda}"
  QUICK="${QUICK:-0}"
  PYTHON="${PYTHON:-python}"
  DATA="${DATA:-}"
  DECODE_BOUND="${DECODE_BOUND:-1.0}"

  die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

  case "$DEVICE" in cuda|cpu) ;; *) die "DEVICE must be cuda or cpu, got '$DEVICE'" ;; esac
  case "$QUICK" in 0|1) ;; *) die "QUICK must be 0 or 1, got '$QUICK'" ;; esac
  [[ "$DECODE_BOUND" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "DECODE_BOUND must be a number of levels >= 0, got '$DECODE_BOUND'"
  if [[ "$DEVICE" == cuda ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
      >/dev/null 2>&1; then
    die "no CUDA device (torch.cuda.is_available() is False); set DEVICE=cpu to run every part on CPU with tiny sizes"
  fi
  if [[ -n "$DATA" && ! -d "$DATA/train" ]]; then
    die "DATA=$DATA has no train/ folder (expected an ImageFolder root: DATA/train/<class>/<image>)"
  fi

  OUT="${OUT:-gpu_check_out}"
  mkdir -p "$OUT"
  OUT="$(cd "$OUT" && pwd)"
  cd "$ROOT"
  CORES="$("$PYTHON" -c 'import os; print(len(os.sched_getaffinity(0)))')"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

  # ---- sizes ------------------------------------------------------------------------------------------------
  if [[ "$DEVICE" == cuda ]]; then
    MODELS=(deit_tiny_patch16_224:128 deit_small_patch16_224:128 deit_base_patch16_224:64)
    TOE_ARGS=(--device cuda --amp --img-size 224 --reps 10 --warmup 3)
    if (( QUICK )); then
      MODELS=(deit_tiny_patch16_224:128)
      TOE_ARGS=(--device cuda --amp --img-size 224 --reps 3 --warmup 1 --op-reps 5)
    fi
    WORKERS="${WORKERS:-$(( CORES < 10 ? CORES : 10 ))}"
    NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
    FAKE=$(( QUICK ? 2560 : 10240 ))
    TRAIN=(--model deit_tiny_patch16_224 --input-size 224 --batch-size 128 --amp fp16 --device cuda)
    DATA_ARGS=(--input-size 224 --batch-size 128 --workers 1 2 "$WORKERS" --repeats $(( QUICK ? 2 : 3 )))
  else
    # tiny: bench_toe at 64 px (16 patches), training a 3-block ViT at 32 px, patch 4 (64 patches)
    MODELS=(deit_tiny_patch16_224:4 deit_small_patch16_224:4 deit_base_patch16_224:4)
    if (( QUICK )); then MODELS=(deit_tiny_patch16_224:4); fi
    TOE_ARGS=(--device cpu --amp --threads 1 --img-size 64 --reps 1 --warmup 0 --op-reps 2)
    WORKERS="${WORKERS:-0}"
    NPROC="${NPROC:-1}"
    FAKE=64
    TRAIN=(--model deit_tiny_patch16_224 --input-size 32 --model-kwargs patch_size=4 depth=3 embed_dim=64
           num_heads=2 --batch-size 16 --amp bf16 --device cpu)
    DATA_ARGS=(--input-size 32 --batch-size 16 --workers 0 1 --repeats 1 --batches 2 --per-image 8
               --prefetch-factors 2)
  fi
  TRAIN+=(--data-set FAKE --epochs 2 --fake-size "$FAKE" --num_workers "$WORKERS" --seed 0)
  TOE=(--toe-r1 0.5 --toe-ng 2)

  FAILED=()
  # run_part NAME CMD...: CMD's stdout+stderr go to OUT/NAME.log; a failure is recorded, not fatal.
  run_part() {
    local name="$1"; shift
    local start=$SECONDS
    printf '[gpu_check] %-26s ' "$name"
    if "$@" >"$OUT/$name.log" 2>&1; then
      echo "ok ($(( SECONDS - start )) s)"
    else
      echo "FAILED (exit $?, $(( SECONDS - start )) s): see $OUT/$name.log"
      FAILED+=("$name")
    fi
  }

  echo "[gpu_check] device $DEVICE, quick $QUICK, $CORES cores, loader workers $WORKERS," \
    "torchrun processes $NPROC -> $OUT"

  # ---- 1. the op and the training step: practical vs theoretical speedup ----------------------------------
  for entry in "${MODELS[@]}"; do
    model="${entry%%:*}"; batch="${entry##*:}"
    run_part "bench_toe_${model%%_patch*}" "$PYTHON" benchmarks/bench_toe.py --model "$model" --batch-size "$batch" \
      "${TOE_ARGS[@]}" --json
  done

  # ---- 2. two epochs on FAKE data: eager / compiled, ToE on / off ---------------------------------------------
  run_part train_eager_toe "$PYTHON" main.py "${TRAIN[@]}" "${TOE[@]}" --output_dir "$OUT/train_eager_toe"
  run_part train_eager_full "$PYTHON" main.py "${TRAIN[@]}" --output_dir "$OUT/train_eager_full"
  run_part train_compile_toe "$PYTHON" main.py "${TRAIN[@]}" "${TOE[@]}" --compile --output_dir "$OUT/train_compile_toe"
  run_part train_compile_full "$PYTHON" main.py "${TRAIN[@]}" --compile --output_dir "$OUT/train_compile_full"

  # ---- 3. the same ToE run under torchrun with exact distributed evaluation (nccl on CUDA) -----------------
  run_part torchrun_toe "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" main.py \
    "${TRAIN[@]}" "${TOE[@]}" --dist-eval --output_dir "$OUT/torchrun_toe"

  # ---- 4. the loader: FAKE (what the runs above read) and DATA; sized for bench_toe's DeiT-tiny rates --------
  # the img/s of bench_toe's DeiT-tiny steps (model only) are the rates the loader has to keep up with
  "$PYTHON" - "$OUT/bench_toe_deit_tiny.log" >"$OUT/rates.txt" <<'PY' || true
import json, sys
rows = [line for line in open(sys.argv[1]) if line.startswith("{")]
if rows:
    r = json.loads(rows[-1])
    print(f"DeiT-tiny full-token step={r['batch_size'] / r['baseline_step_s']:.1f}")
    for s in r["stages"]:
        print(f"ToE stage {s['stage']} of DeiT-tiny={r['batch_size'] / s['step_s']:.1f}")
PY
  mapfile -t RATES <"$OUT/rates.txt"
  run_part bench_data_fake "$PYTHON" benchmarks/bench_data.py --fake-size 512 "${DATA_ARGS[@]}" \
    --device "$DEVICE" --train-img-per-s "${RATES[@]}" --json
  if [[ -n "$DATA" ]]; then
    run_part bench_data_folder "$PYTHON" benchmarks/bench_data.py --data-path "$DATA" "${DATA_ARGS[@]}" \
      --device "$DEVICE" --train-img-per-s "${RATES[@]}" --json
  fi

  # ---- 5. --data-backend pil vs dali: DeiT-tiny + ToE, 2 epochs each, on JPEGs ---------------------------------
  JPEGS="${DATA:-$ROOT/../shared/data/imagenette-mini-64}"
  if [[ -d "$JPEGS/train" ]]; then
    "$PYTHON" - "$JPEGS" "$OUT/backend_data" "$FAKE" <<'PY'
import os, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
# a fixed-size link farm: n training images (repeated when the source has fewer), n // 5 validation images
for split, count in (("train", n), ("val", max(n // 5, 1))):
    root = os.path.join(src, split if os.path.isdir(os.path.join(src, split)) else "train")
    files = sorted((c, f) for c in os.listdir(root) for f in os.listdir(os.path.join(root, c)))
    for k in range(count):
        c, f = files[k % len(files)]
        os.makedirs(os.path.join(dst, split, c), exist_ok=True)
        link = os.path.join(dst, split, c, f"{k // len(files)}_{f}")
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(root, c, f)), link)
PY
    BACKEND_TRAIN=("${TRAIN[@]/FAKE/IMNET}" "${TOE[@]}" --data-path "$OUT/backend_data" --no-model-ema)
    for backend in pil dali; do
      if [[ "$backend" == dali ]] && ! "$PYTHON" -c 'import nvidia.dali' >/dev/null 2>&1; then
        echo "[gpu_check] train_backend_dali         skipped: NVIDIA DALI not installed (pip install -r requirements-dali.txt)"
        continue
      fi
      run_part "train_backend_$backend" "$PYTHON" main.py "${BACKEND_TRAIN[@]}" --data-backend "$backend" \
        --output_dir "$OUT/train_backend_$backend"
    done
  else
    echo "[gpu_check] train_backend_*            skipped: no JPEG folder (set DATA=<ImageFolder root>)"
  fi

  # ---- 6. decoding: the evaluation tensors of --data-backend dali against PIL's on the same 256 files ---------
  if [[ ! -d "$JPEGS/train" ]]; then
    echo "[gpu_check] decode_dali_vs_pil         skipped: no JPEG folder (set DATA=<ImageFolder root>)"
  elif ! "$PYTHON" -c 'import nvidia.dali' >/dev/null 2>&1; then
    echo "[gpu_check] decode_dali_vs_pil         skipped: NVIDIA DALI not installed (pip install -r requirements-dali.txt)"
  else
    run_part decode_dali_vs_pil "$PYTHON" -m dali_loader.check_decode --data-path "$JPEGS" --files 256 \
      --input-size "$( [[ "$DEVICE" == cuda ]] && echo 224 || echo 48 )" --device "$DEVICE" --bound "$DECODE_BOUND"
  fi

  # ---- summary ------------------------------------------------------------------------------------------------
  WORKERS="$WORKERS" "$PYTHON" - "$OUT" "${FAILED[@]}" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, re, sys

out, failed = sys.argv[1], sys.argv[2:]
summary = {"failed": failed, "bench_toe": {}, "train": {}, "bench_data": {}}


def last_json(path):
    try:
        rows = [line for line in open(path) if line.startswith("{")]
    except OSError:
        return None
    return json.loads(rows[-1]) if rows else None


print("\n==== gpu_check summary ====")
for path in sorted(glob.glob(os.path.join(out, "bench_toe_*.log"))):
    r = last_json(path)
    if r is None:
        continue
    share = max((op["share_of_step"] for op in r["op"]), default=0.0)
    stage1 = r["stages"][0]
    print(f"{r['model']} batch {r['batch_size']}: practical {r['practical_speedup']:.3f}x vs theoretical "
          f"{r['theoretical_speedup']:.3f}x (ratio {r['ratio']:.3f}); op {100 * share:.2f}% of a step; "
          f"full-token {r['batch_size'] / r['baseline_step_s']:.0f} img/s, stage 1 "
          f"{r['batch_size'] / stage1['step_s']:.0f} img/s")
    summary["bench_toe"][r["model"]] = {k: r[k] for k in ("practical_speedup", "theoretical_speedup", "ratio")}
    summary["bench_toe"][r["model"]].update(op_share=share, baseline_img_per_s=r["batch_size"] / r["baseline_step_s"])

for name in ("train_eager_toe", "train_eager_full", "train_compile_toe", "train_compile_full", "torchrun_toe"):
    log = os.path.join(out, name, "log.txt")
    if not os.path.isfile(log):
        continue
    rows = [json.loads(line) for line in open(log) if line.strip()]
    summary["train"][name] = rows
    epochs = "; ".join(f"epoch {row.get('epoch')}: {row.get('train_img_per_s', float('nan')):.0f} img/s, "
                       f"{row.get('epoch_time', float('nan')):.1f} s, keep rate {row.get('toe_keep_rate', 1.0):g}"
                       for row in rows)
    print(f"{name:<20} {epochs}")
if any(name.startswith("train_compile") for name in summary["train"]):
    print("(the epoch times of --compile runs include compiling: one graph per ToE stage, and eval)")

log = os.path.join(out, "torchrun_toe.log")
text = open(log).read() if os.path.isfile(log) else ""
found = re.search(r"\b(nccl|gloo)\b", text)
backend = found.group(1) if found else "none (world size 1: main.py starts no process group)"
summary["torchrun_backend"] = backend
print(f"torchrun process group backend: {backend}")

fake = last_json(os.path.join(out, "bench_data_fake.log"))
workers = int(os.environ["WORKERS"])
bound = next((row["img_per_s"] for row in (fake or {}).get("loader", []) if row["workers"] == workers), None)
if bound is not None:
    slow = [name for name, rows in summary["train"].items()
            if rows and max(row.get("train_img_per_s", 0.0) for row in rows) >= 0.8 * bound]
    summary["fake_loader_img_per_s"] = bound
    print(f"the FAKE loader delivers {bound:.0f} img/s with {workers} workers; runs within 80% of that are "
          f"loader-bound (ToE cannot speed them up): {', '.join(slow) if slow else 'none'}")

for path in sorted(glob.glob(os.path.join(out, "bench_data_*.log"))):
    r = last_json(path)
    if r is None:
        continue
    summary["bench_data"][os.path.basename(path)[:-4]] = r
    rows = ", ".join(f"{row['workers']} workers {row['img_per_s']:.0f}" for row in r["loader"])
    print(f"loader on {r['data']} at {r['input_size']} px: {rows} img/s")
    for need in r["needs"]:
        print(f"  {need['label']} at {need['train_img_per_s']:g} img/s needs >= {need['workers']} workers")

# bench_toe's model-only img/s of DeiT-tiny by keep rate: its stage 1 (r1 = 0.5) and the full-token step; the
# part-5 runs use ng = 2, so their stage 1 keeps 0.5 of the tokens and their stage 2 all of them
rates = {}
for line in open(os.path.join(out, "rates.txt")) if os.path.isfile(os.path.join(out, "rates.txt")) else []:
    label, _, value = line.strip().rpartition("=")
    keep = 1.0 if label == "DeiT-tiny full-token step" else 0.5 if label == "ToE stage 1 of DeiT-tiny" else None
    if keep is not None:
        rates[keep] = float(value)
summary["backends"] = {}
for backend in ("pil", "dali"):
    log = os.path.join(out, f"train_backend_{backend}", "log.txt")
    if not os.path.isfile(log):
        continue
    rows = [json.loads(line) for line in open(log) if line.strip()]
    report = []
    for row in rows:
        model_rate = rates.get(row.get("toe_keep_rate"))
        bound = model_rate is not None and row["train_img_per_s"] < 0.8 * model_rate
        report.append({"epoch": row["epoch"], "toe_stage": row.get("toe_stage"),
                       "train_img_per_s": row["train_img_per_s"], "model_only_img_per_s": model_rate,
                       "loader_bound": bound if model_rate is not None else None})
        verdict = "unknown (no bench_toe rate)" if model_rate is None else \
            f"{'LOADER-BOUND' if bound else 'compute-bound'} (model alone {model_rate:.0f} img/s)"
        print(f"--data-backend {backend:<4} epoch {row['epoch']} ToE stage {row.get('toe_stage')}: "
              f"{row['train_img_per_s']:.0f} img/s, {verdict}")
    summary["backends"][backend] = report

decode = last_json(os.path.join(out, "decode_dali_vs_pil.log"))
if decode is not None:
    summary["decode"] = decode
    for key, gap in decode.items():
        if isinstance(gap, dict):
            print(f"decode {key.replace('_', ' ')}: mean {gap['mean']:.3f} levels (99th percentile {gap['p99']:.2f}, "
                  f"max {gap['max']:.0f}) on {decode['files']} files at {decode['input_size']} px")
    print(f"decode bound: mean <= {decode['bound']:g} level for the {'cuda' if 'dali_cuda_vs_pil' in decode else 'cpu'} "
          f"graph")

print(f"failed parts: {', '.join(failed) if failed else 'none'}")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f)
PY

  (( ${#FAILED[@]} == 0 ))
}

main "$@"
