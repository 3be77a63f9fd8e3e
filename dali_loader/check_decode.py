"""Evaluation tensors of ``--data-backend dali`` against the PIL path's on the same files.

    python -m dali_loader.check_decode --data-path /work/shared/data/imagenette-mini-64 --files 256 \
        --input-size 48 --device cpu

Decodes the first ``--files`` images of DATA/val (DATA/train without one) with both evaluation pipelines
(datasets.build_eval_transform on PIL; dali_loader's DaliEvalLoader), and prints the mean absolute difference,
99th percentile and maximum in 0-255 levels (normalised difference x std x 255). On ``--device cuda`` the
DALI graph decodes with nvJPEG ("mixed") and the DALI CPU graph is measured too, so the decoder's share of the
gap shows. The last line is JSON. Exit 0 when the mean gap of ``--device``'s DALI graph is at most ``--bound``,
1 when over it, 2 with one ``error:`` line for bad arguments or data (benchmarks/gpu_check.sh part 6).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

PROG = "check_decode"
# mean |DALI - PIL| in levels allowed on the GPU: the CPU graph measures 0.1-0.2 (README); nvJPEG's IDCT may
# round differently from libjpeg-turbo's, not by a level on average
DEFAULT_BOUND = 1.0


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage block would hide the reason; print one line
        self.exit(2, f"{PROG}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog=PROG, description="DALI vs PIL evaluation tensors on the same files")
    p.add_argument("--data-path", required=True, help="ImageFolder root with val/ (or train/)")
    p.add_argument("--files", type=int, default=256, help="how many files, in folder order (default 256)")
    p.add_argument("--input-size", type=int, default=224, help="evaluation size S (default 224)")
    p.add_argument("--eval-crop-ratio", type=float, default=0.875, help="as main.py's (default 0.875)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the DALI graph's device")
    p.add_argument("--bound", type=float, default=DEFAULT_BOUND,
                   help=f"largest mean |DALI - PIL| in 0-255 levels that passes (default {DEFAULT_BOUND})")
    p.add_argument("--threads", type=int, default=2, help="DALI threads (default 2)")
    return p


def _folder(root: str):
    import datasets

    if not os.path.isdir(os.path.join(root, "train")):
        raise datasets.DataError(f"--data-path {root} has no train/ folder (ImageFolder root: train/<class>/...)")
    split = os.path.join(root, "val") if os.path.isdir(os.path.join(root, "val")) else os.path.join(root, "train")
    return datasets.SafeImageFolder(split, class_root=os.path.join(root, "train"))


def _dali_tensors(folder, count: int, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    from dali_loader.loader import DaliEvalLoader

    sampler = torch.utils.data.SequentialSampler(range(count))
    loader = DaliEvalLoader(folder, sampler, args.input_size, args.eval_crop_ratio, 64, args.threads, device)
    return torch.cat([images.float().cpu() for images, _ in loader])


def gaps(reference: torch.Tensor, images: torch.Tensor) -> Dict[str, float]:
    """|images - reference| of normalised tensors [N, 3, S, S] in 0-255 levels: mean, 99th percentile, max."""
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    diff = ((images - reference).abs() * std).flatten()
    sample = diff[torch.randperm(diff.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    return {"mean": float(diff.mean()), "p99": float(sample.quantile(0.99)), "max": float(diff.max())}


def measure(args: argparse.Namespace) -> Dict[str, object]:
    """The gaps of each DALI graph (``args.device``, and the CPU one on cuda) to the PIL path."""
    import datasets

    folder = _folder(args.data_path)
    count = min(args.files, len(folder))
    if count == 0:
        raise datasets.DataError(f"no images under {args.data_path}")
    tf = datasets.build_eval_transform(args.input_size, args.eval_crop_ratio)
    reference = torch.stack([tf(datasets._load_rgb(folder.samples[i][0])) for i in range(count)])
    devices = ["cpu"] if args.device == "cpu" else ["cuda", "cpu"]
    result: Dict[str, object] = {"files": count, "input_size": args.input_size, "bound": args.bound}
    outputs = {d: _dali_tensors(folder, count, args, torch.device(d)) for d in devices}
    for d in devices:
        result[f"dali_{d}_vs_pil"] = gaps(reference, outputs[d])
    if args.device == "cuda":
        result["dali_cuda_vs_dali_cpu"] = gaps(outputs["cpu"], outputs["cuda"])
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.files < 1 or args.input_size < 1 or args.threads < 1:
        print(f"{PROG}: error: --files, --input-size and --threads must be >= 1", file=sys.stderr)
        return 2
    from dali_loader import require_dali
    from runtime.errors import DataError

    try:
        require_dali()
        if args.device == "cuda" and not torch.cuda.is_available():
            raise DataError("--device cuda needs a CUDA device (torch.cuda.is_available() is False)")
        result = measure(args)
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    lines: List[str] = []
    for key, g in result.items():
        if isinstance(g, dict):
            lines.append(f"{key}: mean {g['mean']:.3f}, 99th percentile {g['p99']:.2f}, max {g['max']:.1f} levels")
    measured = result[f"dali_{args.device}_vs_pil"]["mean"]  # type: ignore[index]
    verdict = "within" if measured <= args.bound else "OVER"
    print(f"{result['files']} files at {args.input_size} px, mean |DALI - PIL| in 0-255 levels:")
    print("\n".join("  " + line for line in lines))
    print(f"dali {args.device}: mean {measured:.3f} levels, {verdict} the bound {args.bound:g}")
    print(json.dumps(result))
    return 0 if measured <= args.bound else 1


if __name__ == "__main__":
    sys.exit(main())
