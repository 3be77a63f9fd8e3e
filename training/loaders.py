"""The run's data: the evaluation loader, and the training set with its sampler and loader, rebuilt only when a
curriculum phase starts. PIL DataLoaders or, with --data-backend dali, the DALI loaders (dali_loader/)."""
from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import torch

import samplers
import utils
from runtime.errors import UsageError


class CountedLoader:
    """A data loader that counts the batches it has handed out in the current pass (for the stop line)."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.handed_out = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.handed_out = 0
        for batch in self.loader:
            self.handed_out += 1
            yield batch


def loader_options(data_cfg: Any, device: torch.device) -> Dict[str, Any]:
    """DataLoader keyword arguments of --num_workers, --pin-mem, --prefetch-factor, --persistent-workers."""
    options: Dict[str, Any] = {"num_workers": data_cfg.num_workers,
                               "pin_memory": data_cfg.pin_memory and device.type == "cuda"}
    if data_cfg.num_workers > 0:
        options.update(prefetch_factor=data_cfg.prefetch_factor, persistent_workers=data_cfg.persistent_workers)
    return options


def build_eval_loader(data_cfg: Any, input_size: int, placement: Any, device: torch.device) -> Tuple[Any, int, Any]:
    """(validation set, its number of classes, its loader) at ``input_size``; UsageError when it is empty."""
    import datasets

    dali = data_cfg.backend == "dali"  # DALI reads the files itself: no PIL transform
    transform = None if dali else datasets.build_eval_transform(input_size, data_cfg.aug.eval_crop_ratio)
    val_set, num_classes = datasets.build_dataset(False, data_cfg.spec, transform)
    if len(val_set) == 0:
        raise UsageError(f"the validation split of {data_cfg.spec.name} is empty")
    if data_cfg.dist_eval and placement.distributed:
        sampler = samplers.DistributedEvalSampler(val_set, num_replicas=placement.world_size, rank=placement.rank)
    else:
        sampler = torch.utils.data.SequentialSampler(val_set)
    batch_size = int(1.5 * data_cfg.batch_size)
    if dali:
        from dali_loader.loader import DaliEvalLoader

        loader = DaliEvalLoader(val_set, sampler, input_size, data_cfg.aug.eval_crop_ratio, batch_size,
                                data_cfg.num_workers, device)
        return val_set, num_classes, loader
    loader = torch.utils.data.DataLoader(val_set, sampler=sampler, batch_size=batch_size,
                                         **loader_options(data_cfg, device))
    return val_set, num_classes, loader


class TrainData:
    """The training set, its sampler and its loader (a :class:`CountedLoader`), built for ``start_epoch``.

    ``recipe`` makes the data set (training.recipes), ``plan`` says each epoch's augmentation and micro-batch
    scale (training.curriculum_plan). Every epoch the sampler and the loader's worker seeds are re-seeded from
    the epoch's seed, so an epoch's batches depend only on (seed, rank, epoch).
    """

    def __init__(self, recipe: Any, plan: Any, data_cfg: Any, num_classes: int, seed: int, placement: Any,
                 device: torch.device, start_epoch: int) -> None:
        self.recipe, self.plan, self.data_cfg = recipe, plan, data_cfg
        self.num_classes, self.seed, self.device = num_classes, seed, device
        world, rank = placement.world_size, placement.rank
        self.loader_phase = None
        self.train_set = recipe.train_dataset(plan.augment(start_epoch), num_classes, seed)
        if data_cfg.repeated_aug:
            self.sampler = samplers.RASampler(self.train_set, num_replicas=world, rank=rank, shuffle=True,
                                              num_repeats=data_cfg.ra_reps, seed=seed)
        elif placement.distributed:
            self.sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=world, rank=rank,
                                                               shuffle=True, seed=seed)
        else:  # draws from torch's global generator, which every epoch seeds from (seed, rank, epoch)
            self.sampler = torch.utils.data.RandomSampler(self.train_set)
        self.generator = torch.Generator()  # worker seeds, re-seeded every epoch
        self._make_loader(start_epoch)
        if len(self.loader) == 0:
            raise UsageError(f"the training set ({len(self.train_set)} images over {world} processes) is smaller "
                             f"than one batch of {data_cfg.batch_size}")

    def updates_per_epoch(self, grad_accum_steps: int) -> int:
        """Optimizer updates per epoch at the unscaled micro-batch (the last group may be shorter)."""
        micro_batches = len(self.sampler) // self.data_cfg.batch_size
        return max(-(-micro_batches // grad_accum_steps), 1)

    def start_epoch(self, epoch: int, epoch_seed: int) -> None:
        """Re-seed the sampler and the workers for ``epoch``; a new curriculum phase gets its own loader."""
        self.generator.manual_seed(epoch_seed)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self._make_loader(epoch)

    def _make_loader(self, epoch: int) -> None:
        """(Re)build the training loader; with a curriculum only when ``epoch`` starts a new phase."""
        phase = self.plan.phase(epoch)
        if phase == self.loader_phase:
            return
        if self.loader_phase is not None:
            # same images, same length: the sampler's index stream is unaffected
            self.train_set = self.recipe.train_dataset(self.plan.augment(epoch), self.num_classes, self.seed)
        self.loader_phase = phase
        batch_size = self.data_cfg.batch_size * self.plan.batch_scale(epoch)
        if self.data_cfg.backend == "dali":
            from dali_loader.loader import DaliTrainLoader

            self.loader = CountedLoader(DaliTrainLoader(self.train_set, self.sampler, self.plan.augment(epoch),
                                                        batch_size, self.data_cfg.num_workers, self.device,
                                                        self.generator))
            return
        self.loader = CountedLoader(torch.utils.data.DataLoader(
            self.train_set, sampler=self.sampler, batch_size=batch_size, drop_last=True,
            worker_init_fn=utils.seed_worker, generator=self.generator, **loader_options(self.data_cfg, self.device)))
