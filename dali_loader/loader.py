"""Iterables of (images, labels) batches from DALI pipelines, drop-in for the trainer's DataLoaders.

The index stream comes from the repository's own samplers (repeated augmentation, distributed, seeded by
(seed, epoch, rank)); a thread pool reads the files of each batch and ``fn.external_source`` hands them to
DALI. The pool lives for one pass over the data and is shut down when the pass ends or is abandoned, so a
loader replaced by the next curriculum phase, or left at the end of the run, holds no threads. Each epoch
builds a new pipeline seeded from the trainer's per-epoch loader generator (as DataLoader draws its worker
seeds), so an epoch's augmentations depend only on (seed, epoch, rank) and a resumed run repeats them bitwise.

Undecodable files: the pipeline's error is traced to the file with PIL; without ``skip_bad_images`` it
stops with CorruptImageError naming it. With skipping on, the file is replaced by the next readable sample
(as the PIL path does), counted in the data set's counters, and the pipeline is rebuilt from the failed
batch on with a seed derived from (epoch seed, batch index), so the rerun of that epoch is deterministic.
"""
from __future__ import annotations

import abc
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

import datasets
from dali_loader import pipeline as dali_pipeline
from runtime.errors import DataError

READER_THREAD_PREFIX = "dali-file-reader"  # the names of the threads that read the files


def _read(path: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise datasets.CorruptImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


class _BatchSource:
    """``fn.external_source`` callback: iteration i -> the encoded files and labels of batch ``first + i``."""

    def __init__(self, loader: "_DaliLoaderBase", indices: Sequence[int], first: int,
                 pool: ThreadPoolExecutor) -> None:
        self.loader, self.indices, self.first, self.pool = loader, indices, first, pool
        self.fed = first  # the next batch index to be fed

    def __call__(self, info: Any) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        batch = self.first + info.iteration
        chunk = self.loader.batch_indices(self.indices, batch)
        if not chunk:
            raise StopIteration
        self.fed = batch + 1
        samples = self.loader.samples
        data = list(self.pool.map(_read, [samples[i][0] for i in chunk]))
        return data, [np.array(samples[i][1], dtype=np.int64) for i in chunk]


class _DaliLoaderBase(abc.ABC):
    def __init__(self, dataset: Any, sampler: Any, batch_size: int, num_threads: int, device: torch.device,
                 drop_last: bool) -> None:
        if not hasattr(dataset, "samples"):
            raise DataError(f"--data-backend dali reads image files; {type(dataset).__name__} has none")
        self.dataset, self.sampler, self.batch_size = dataset, sampler, int(batch_size)
        self.samples = list(dataset.samples)
        self.num_threads = max(1, int(num_threads))
        self.device, self.drop_last = device, drop_last
        self.device_id = device.index or 0 if device.type == "cuda" else None
        self.replaced: dict = {}  # bad sample -> its replacement, found in this epoch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batch_indices(self, indices: Sequence[int], batch: int) -> List[int]:
        if batch >= len(self):
            return []
        chunk = indices[batch * self.batch_size:(batch + 1) * self.batch_size]
        return [self.replaced.get(i, i) for i in chunk]

    @abc.abstractmethod
    def _build(self, source: _BatchSource, seed: int):
        """The DALI pipeline of this loader (training or evaluation graph), fed by ``source``."""

    def _outputs(self, pipe) -> tuple:
        outs = pipe.run()
        return tuple(_to_torch(o, self.device) for o in outs)

    def _iterate(self, indices: Sequence[int], seed: int) -> Iterator[tuple]:
        batch = 0
        self.replaced = {}
        # one pool per pass: closing the generator (pass finished, abandoned or failed) shuts it down
        pool = ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix=READER_THREAD_PREFIX)
        try:
            while batch < len(self):
                source = _BatchSource(self, indices, batch, pool)
                pipe = self._build(source, seed if batch == 0 else (seed * 1_000_003 + batch) % 2**31)
                try:
                    while batch < len(self):
                        try:
                            outs = self._outputs(pipe)
                        except RuntimeError as e:  # DALI reports a bad file as a RuntimeError of the batch
                            self._handle_bad(indices, batch, source.fed, e)
                            break
                        batch += 1
                        yield outs
                finally:
                    del pipe
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _handle_bad(self, indices: Sequence[int], batch: int, fed: int, error: Exception) -> None:
        """Find the undecodable files of batches batch..fed-1 with PIL; raise, or mark them replaced."""
        candidates = [i for b in range(batch, max(fed, batch + 1)) for i in self.batch_indices(indices, b)]
        bad = [i for i in dict.fromkeys(candidates) if not _decodes(self.samples[i][0])]
        if not bad:
            first = str(error).strip().splitlines()
            raise DataError(f"DALI pipeline failed: {first[-1] if first else type(error).__name__}") from None
        if not getattr(self.dataset, "skip_bad_images", False):
            raise datasets.CorruptImageError(f"cannot decode image {self.samples[bad[0]][0]} (DALI)") from None
        for i in bad:
            self.replaced[i] = self._replacement(i)
            self.dataset._skip_counter[0] += 1
            self.dataset._bad_flags[i] = 1

    def _replacement(self, index: int) -> int:
        n = len(self.samples)
        for step in range(1, n):
            j = (index + step) % n
            if _decodes(self.samples[j][0]):
                return j
        raise DataError(f"no readable image in data set ({n} files tried)")


class DaliTrainLoader(_DaliLoaderBase):
    """Training batches (images float [B, 3, S, S], labels int64 [B]) of ``aug`` (datasets.AugmentConfig),
    full batches only; random erasing (timm's RandomErasing, --reprob/--remode/--recount) on the batch's
    device. ``generator`` gives each epoch's pipeline seed."""

    def __init__(self, dataset: Any, sampler: Any, aug: Any, batch_size: int, num_threads: int,
                 device: torch.device, generator: torch.Generator) -> None:
        super().__init__(dataset, sampler, batch_size, num_threads, device, drop_last=True)
        self.aug, self.generator = aug, generator
        dali_pipeline.check_augment(aug)  # refuse what the graph lacks, and bad values, before the first epoch
        self.erasing = None
        if aug.reprob > 0 and not aug.three_augment:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(probability=aug.reprob, mode=aug.remode, max_count=aug.recount,
                                         device=str(device))

    def _build(self, source: _BatchSource, seed: int):
        return dali_pipeline.build_train_pipeline(self.aug, self.batch_size, self.num_threads, self.device_id,
                                                  seed, source)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator)) % 2**31
        indices = list(iter(self.sampler))
        for images, labels in self._iterate(indices, seed):
            if self.erasing is not None:
                images = self.erasing(images.to(self.device))
            yield images, labels


class DaliEvalLoader(_DaliLoaderBase):
    """Evaluation batches of the sampler's indices in order (the last one may be shorter)."""

    def __init__(self, dataset: Any, sampler: Any, input_size: int, crop_ratio: float, batch_size: int,
                 num_threads: int, device: torch.device) -> None:
        super().__init__(dataset, sampler, batch_size, num_threads, device, drop_last=False)
        self.input_size, self.crop_ratio = input_size, crop_ratio

    def _build(self, source: _BatchSource, seed: int):
        return dali_pipeline.build_eval_pipeline(self.input_size, self.crop_ratio, self.batch_size,
                                                 self.num_threads, self.device_id, source)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self._iterate(list(iter(self.sampler)), 0)


def _decodes(path: str) -> bool:
    try:
        datasets._load_rgb(path)
        return True
    except datasets._DECODE_ERRORS:
        return False


def _to_torch(batch: Any, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (CPU or GPU) as one torch tensor (on the GPU the copy stays on the device)."""
    if type(batch).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        tensor = batch.as_tensor()
        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(batch.as_tensor()))


def augment_files(aug: Any, paths: Sequence[str], labels: Sequence[int], seed: int, batch_size: int = 64,
                  num_threads: int = 1, device_id: Optional[int] = None, debug: bool = True) -> List[tuple]:
    """Run the training graph once over ``paths`` (test and benchmark hook): one tuple of numpy arrays per
    batch, (images, labels[, crop anchor, crop shape, flip, RandAugment ops, magnitude bins, resize filter code]
    with ``debug``)."""
    chunks = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]

    def source(info: Any):
        if info.iteration >= len(chunks):
            raise StopIteration
        chunk = chunks[info.iteration]
        return [np.fromfile(paths[i], dtype=np.uint8) for i in chunk], [np.array(labels[i]) for i in chunk]

    pipe = dali_pipeline.build_train_pipeline(aug, batch_size, num_threads, device_id, seed, source, debug=debug)
    results = []
    for _ in chunks:
        outs = pipe.run()
        results.append(tuple(np.stack([np.array(o.as_cpu().at(k) if hasattr(o, "as_cpu") else o.at(k))
                                       for k in range(len(o))]) for o in outs))
    return results
