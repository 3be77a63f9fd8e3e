"""Run a Config: build the pieces, resume, then train epoch by epoch (or only evaluate / time).

After every epoch the log row is appended to log.txt first and the checkpoint written second (both
atomically); a kill between the two re-runs that epoch on resume, and the resume truncates the log, so
every epoch is logged once and a resumed run continues bitwise as if never stopped.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import torch

from training import builders, resume
from runtime import checkpoint
from runtime import distributed
import engine
from runtime import interrupts
from runtime import rundir
from runtime import runlog
import samplers
import utils
from runtime.errors import EXIT_INTERRUPTED, EXIT_NONFINITE, CheckpointError, UsageError, fail
from training.recipes import recipe_for

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def run(cfg: Any) -> int:
    """Train, evaluate (--eval) or time (--throughput) as ``cfg`` says; returns the exit code."""
    placement = distributed.start(cfg.run.device.startswith("cuda"), cfg.run.dist_url, cfg.run.local_rank)
    device = torch.device(f"cuda:{placement.local_rank}" if placement.distributed and
                          cfg.run.device.startswith("cuda") else cfg.run.device)
    lock = _claim_output_dir(cfg, placement)  # before anything is written
    trainer = None
    try:
        print(f"run: {placement.world_size} process(es) on {device}, amp {cfg.run.amp}, global batch "
              f"{cfg.run.global_batch}, lr {cfg.optim.lr:.4g}, data backend {cfg.data.backend}", flush=True)
        print(json.dumps(cfg.flags, sort_keys=True), flush=True)
        trainer = Trainer(cfg, placement, device)
        code = trainer.throughput() if cfg.run.throughput else trainer.evaluate_only() if cfg.run.eval_only \
            else trainer.fit()
    except Exception:
        if not interrupts.received():
            raise
        code = _interrupted(cfg, trainer)  # a peer's exit broke a collective: part of the same stop
    except KeyboardInterrupt:
        code = _interrupted(cfg, trainer)
    finally:
        if lock is not None:
            lock.release()
    if code != EXIT_INTERRUPTED:
        distributed.stop()
    return code


def _claim_output_dir(cfg: Any, placement: distributed.Placement) -> Optional[rundir.FolderLock]:
    """Rank 0 locks the output folder and refuses to replace an earlier run; every rank learns the outcome."""
    if not cfg.run.output_dir or cfg.run.eval_only or cfg.run.throughput:
        return None
    lock, problem = None, None
    if placement.is_main:
        try:
            lock = rundir.claim(cfg.run.output_dir, cfg.run.resume, cfg.run.overwrite)
        except UsageError as e:
            problem = str(e)
    problem = distributed.share_from_main(problem)
    if problem is not None:
        distributed.stop()
        raise UsageError(problem)
    return lock


def _interrupted(cfg: Any, trainer: Optional["Trainer"]) -> int:
    """The one line of a Ctrl-C / SIGTERM: where the run stopped and how to continue it."""
    where = trainer.position() if trainer is not None else "before training started"
    ckpt = os.path.join(cfg.run.output_dir, "checkpoint.pth") if cfg.run.output_dir else ""
    if cfg.run.eval_only or cfg.run.throughput or not ckpt:
        hint = "nothing was written"
    elif not os.path.isfile(ckpt):
        hint = "no epoch was completed, so there is no checkpoint yet; rerun the same command to start again"
    else:
        done = f"{ckpt} (last completed epoch {checkpoint.epoch_of(ckpt)})"
        same = cfg.run.resume_flag.lower() == "auto" or (
            os.path.isfile(cfg.run.resume_flag) and os.path.samefile(cfg.run.resume_flag, ckpt))
        hint = (f"rerun the same command to resume from {done}" if same and not cfg.run.overwrite else
                f"resume from {done} by rerunning with --resume auto (without --overwrite or --resume "
                f"{cfg.run.resume_flag})")
    return fail(f"interrupted {where}; {hint}", EXIT_INTERRUPTED, prefix="")


class _CountedLoader:
    """A data loader that counts the batches it has handed out in the current pass (for the stop line)."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.handed_out = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.handed_out = 0
        for batch in self.loader:
            self.handed_out += 1
            yield batch


class Trainer:
    """The run's objects (model, EMA, data, optimizer, ...) and the steps that use them."""

    def __init__(self, cfg: Any, placement: distributed.Placement, device: torch.device) -> None:
        self.cfg, self.placement, self.device = cfg, placement, device
        self.amp_dtype = _AMP_DTYPES[cfg.run.amp]
        self.recipe = recipe_for(cfg)
        self.resume_ckpt = checkpoint.read(cfg.run.resume) if cfg.run.resume else None
        if self.resume_ckpt is not None and "model" not in self.resume_ckpt and not cfg.run.eval_only:
            raise CheckpointError(f"cannot resume from {cfg.run.resume}: it has no 'model' entry "
                                  f"(use --finetune for bare weights)")
        finetune = checkpoint.read(cfg.model.finetune) if cfg.model.finetune else None
        teacher_weights = checkpoint.read(cfg.distill.teacher_path) if cfg.distill.kind != "none" else None
        utils.seed_everything(cfg.run.seed)  # the same initial weights on every rank
        self.num_classes = cfg.data.spec.fake_classes
        self.val_loader = None
        if not cfg.run.throughput:
            self._build_eval_data()
        self._build_model(None if finetune is None else checkpoint.model_weights(finetune))
        self.teacher = None if teacher_weights is None else builders.build_teacher(
            cfg.distill, self.num_classes, cfg.model.input_size, checkpoint.model_weights(teacher_weights), device)
        self.start_epoch, self.max_accuracy = cfg.run.start_epoch, 0.0
        self.epoch_now: Optional[int] = None  # the epoch being trained, for the stop line
        self.evaluating = False

    # ----------------------------------------------------------------------------------------- building
    def _build_eval_data(self) -> None:
        import datasets

        cfg = self.cfg
        dali = cfg.data.backend == "dali"  # DALI reads the files itself: no PIL transform
        transform = None if dali else datasets.build_eval_transform(cfg.model.input_size, cfg.data.aug.eval_crop_ratio)
        self.val_set, self.num_classes = datasets.build_dataset(False, cfg.data.spec, transform)
        if len(self.val_set) == 0:
            raise UsageError(f"the validation split of {cfg.data.spec.name} is empty")
        if cfg.data.dist_eval and self.placement.distributed:
            sampler = samplers.DistributedEvalSampler(self.val_set, num_replicas=self.placement.world_size,
                                                      rank=self.placement.rank)
        else:
            sampler = torch.utils.data.SequentialSampler(self.val_set)
        if dali:
            from dali_loader.loader import DaliEvalLoader

            self.val_loader = DaliEvalLoader(self.val_set, sampler, cfg.model.input_size, cfg.data.aug.eval_crop_ratio,
                                             int(1.5 * cfg.data.batch_size), cfg.data.num_workers, self.device)
            return
        self.val_loader = torch.utils.data.DataLoader(
            self.val_set, sampler=sampler, batch_size=int(1.5 * cfg.data.batch_size), **self._loader_options())

    def _loader_options(self) -> Dict[str, Any]:
        data = self.cfg.data
        options: Dict[str, Any] = {"num_workers": data.num_workers,
                                   "pin_memory": data.pin_memory and self.device.type == "cuda"}
        if data.num_workers > 0:
            options.update(prefetch_factor=data.prefetch_factor, persistent_workers=data.persistent_workers)
        return options

    def _model_extra_kwargs(self) -> Dict[str, Any]:
        extra = dict(self.recipe.model_kwargs())
        if self.cfg.curriculum is not None:
            extra["dynamic_img_size"] = True  # timm interpolates pos_embed to each phase's input size
        return extra

    def _build_model(self, finetune_state: Optional[Dict[str, Any]]) -> None:
        cfg = self.cfg
        model, report = builders.build_model(cfg.model, cfg.toe, self.num_classes, self._model_extra_kwargs(),
                                             finetune_state, distilled_training=cfg.distill.kind != "none")
        if report is not None:
            print(f"fine-tuning from {cfg.model.finetune}: re-initialised {report['dropped'] or 'no classifier'}"
                  f"{'; pos_embed resampled' if report['resampled'] else ''}")
        self.num_patches = builders.num_patches(model)
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", 16)
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.gflops: Dict[int, Dict[str, Any]] = {}
        if not (cfg.run.eval_only or cfg.run.throughput):
            self.gflops = gflops_by_size(model, cfg, self._train_sizes())  # on CPU, before the move
        self.plain_model = model.to(self.device)
        self.model_ema = builders.build_ema(model, cfg.model)
        self.ema_device = torch.device("cpu") if cfg.model.ema_on_cpu else self.device
        self.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"model {cfg.model.name}: {self.n_parameters} trainable parameters, {self.num_patches} patches")
        self.model = torch.compile(model, backend=cfg.model.compile_backend) if cfg.model.compile else model
        if self.placement.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _train_sizes(self):
        curriculum = self.cfg.curriculum
        if curriculum is None:
            return [self.cfg.model.input_size]
        return sorted({curriculum.input_size(e) for e in range(self.cfg.run.epochs)})

    def _build_training(self) -> None:
        cfg = self.cfg
        world, rank = self.placement.world_size, self.placement.rank
        self.loader_phase = None
        self.train_set = self.recipe.train_dataset(self._phase_augment(self.start_epoch), self.num_classes,
                                                   cfg.run.seed)
        if cfg.data.repeated_aug:
            self.sampler = samplers.RASampler(self.train_set, num_replicas=world, rank=rank, shuffle=True,
                                              num_repeats=cfg.data.ra_reps, seed=cfg.run.seed)
        elif self.placement.distributed:
            self.sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=world, rank=rank,
                                                               shuffle=True, seed=cfg.run.seed)
        else:  # draws from torch's global generator, which every epoch seeds from (seed, rank, epoch)
            self.sampler = torch.utils.data.RandomSampler(self.train_set)
        self.loader_generator = torch.Generator()  # worker seeds, re-seeded every epoch
        self._make_train_loader(self.start_epoch)
        if len(self.train_loader) == 0:
            raise UsageError(f"the training set ({len(self.train_set)} images over {world} processes) is smaller "
                             f"than one batch of {cfg.data.batch_size}")
        self.mixup_fn = builders.build_mixup(cfg.data.mixup, cfg.data.smoothing, self.num_classes) \
            if self.recipe.uses_mixup else None
        self.criterion = self.recipe.criterion(self.teacher, self.mixup_fn is not None)
        self.optimizer = builders.build_optimizer(self.plain_model, cfg.optim, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        # the engine's optimizer updates per epoch at the unscaled micro-batch (the last group may be shorter)
        micro_batches = len(self.sampler) // cfg.data.batch_size
        self.updates_per_epoch = max(-(-micro_batches // cfg.run.grad_accum_steps), 1)
        self.lr_scheduler = builders.build_scheduler(self.optimizer, cfg.optim,
                                                     cfg.run.schedule_epochs or cfg.run.epochs,
                                                     self.updates_per_epoch, cfg.run.seed)

    def _phase_augment(self, epoch: int):
        import datasets

        aug, curriculum = self.cfg.data.aug, self.cfg.curriculum
        if curriculum is None:
            return aug
        # fourier: the loader augments at the final size; the device crops to the phase size (_downsample)
        size = self.cfg.model.input_size if curriculum.downsample == "fourier" else curriculum.input_size(epoch)
        return aug.with_train_stage(size,
                                    datasets.aa_with_magnitude(aug.aa, curriculum.magnitude(epoch)))

    def _phase_size(self, epoch: int) -> int:
        """The input size the model trains on at ``epoch``."""
        curriculum = self.cfg.curriculum
        return self.cfg.model.input_size if curriculum is None else curriculum.input_size(epoch)

    def _downsample(self, epoch: int):
        """The device-side reduction of a fourier curriculum's batches at ``epoch``, or None."""
        size = self._phase_size(epoch)
        if self.cfg.curriculum is None or self.cfg.curriculum.downsample != "fourier" or \
                size == self.cfg.model.input_size:
            return None
        from functools import partial

        from toe.curriculum import frequency_crop

        return partial(frequency_crop, size=size)

    def _update_hook(self, epoch: int):
        """--sched-on-updates: set the lr of the epoch's first update, and return the engine's per-update step.
        Indices restart from epoch x updates_per_epoch every epoch, so a resume, or a phase whose micro-batch
        layout gives one update more or less, stays on the same curve."""
        if not self.cfg.optim.sched_on_updates:
            return None
        first = epoch * self.updates_per_epoch
        self.lr_scheduler.step_update(first)
        return lambda done: self.lr_scheduler.step_update(first + done)

    def _batch_scale(self, epoch: int) -> int:
        """--curriculum-batch-scale: the factor f by which a low-resolution phase's micro-batch grows while
        --grad-accum-steps shrinks by f (the global batch is unchanged). f is (final size / phase size)^2
        rounded, as a phase's memory per image scales with its token count, and must divide the
        accumulation steps (it is lowered to the largest divisor that fits). 1 without the option."""
        if not self.cfg.run.curriculum_batch_scale or self.cfg.curriculum is None:
            return 1
        ratio = round((self.cfg.model.input_size / self.cfg.curriculum.input_size(epoch)) ** 2)
        accum = self.cfg.run.grad_accum_steps
        return max(f for f in range(1, accum + 1) if accum % f == 0 and f <= max(ratio, 1))

    def _make_train_loader(self, epoch: int) -> None:
        """(Re)build the training loader; with a curriculum only when ``epoch`` starts a new phase."""
        phase = self.cfg.curriculum.phase(epoch) if self.cfg.curriculum is not None else 0
        if phase == self.loader_phase:
            return
        if self.loader_phase is not None:
            # same images, same length: the sampler's index stream is unaffected
            self.train_set = self.recipe.train_dataset(self._phase_augment(epoch), self.num_classes,
                                                       self.cfg.run.seed)
        self.loader_phase = phase
        if self.cfg.data.backend == "dali":
            from dali_loader.loader import DaliTrainLoader

            self.train_loader = _CountedLoader(DaliTrainLoader(
                self.train_set, self.sampler, self._phase_augment(epoch), self.cfg.data.batch_size *
                self._batch_scale(epoch), self.cfg.data.num_workers, self.device, self.loader_generator))
            return
        self.train_loader = _CountedLoader(torch.utils.data.DataLoader(
            self.train_set, sampler=self.sampler, batch_size=self.cfg.data.batch_size * self._batch_scale(epoch),
            drop_last=True,
            worker_init_fn=utils.seed_worker, generator=self.loader_generator, **self._loader_options()))

    # ------------------------------------------------------------------------------------------- resume
    def _load_weights(self) -> None:
        ckpt, path = self.resume_ckpt, self.cfg.run.resume
        try:
            self.plain_model.load_state_dict(checkpoint.model_weights(ckpt), strict=True)
            if self.model_ema is not None:
                if ckpt.get("model_ema") is not None:
                    self.model_ema.module.load_state_dict(ckpt["model_ema"], strict=True)
                else:
                    self.model_ema.set(self.plain_model)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path} does not fit model {self.cfg.model.name}: "
                                  f"{self._why_not_fitting(ckpt) or str(e).splitlines()[0]}") from None

    def _why_not_fitting(self, ckpt: Dict[str, Any]) -> str:
        """The saved run's architecture flags that differ from this run's, else the first mismatched keys."""
        saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        blocking, _ = resume.changes_since(saved, self.cfg.flags)
        changed = {k: v for k, v in blocking.items() if k in resume.ARCHITECTURE_FLAGS}
        if changed:
            return "changed since the checkpoint's run: " + "; ".join(_change_text(k, v) for k, v in changed.items())
        return checkpoint.describe_mismatch(checkpoint.model_weights(ckpt), self.plain_model.state_dict())

    def _check_changes(self) -> Dict[str, Any]:
        """Refuse a resume under another model or ToE setting; note allowed changes (epochs, lr, batch)."""
        saved = self.resume_ckpt.get("args") if isinstance(self.resume_ckpt.get("args"), dict) else {}
        blocking, noted = resume.changes_since(saved, self.cfg.flags)
        text = "; ".join(_change_text(k, v) for k, v in {**blocking, **noted}.items())
        if blocking and not self.cfg.run.resume_changed_ok:
            raise UsageError(f"{self.cfg.run.resume} was trained with other settings: {text}; resume with "
                             f"--resume-changed-ok to continue anyway, or use another --output_dir")
        if blocking or noted:
            print(f"notice: resuming with changed settings: {text}", flush=True)
        return {**blocking, **noted}

    def _resume_training_state(self) -> None:
        """Optimizer, scheduler, scaler and RNG from the checkpoint."""
        ckpt, path = self.resume_ckpt, self.cfg.run.resume
        if "optimizer" in ckpt and "epoch" in ckpt:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
                if ckpt.get("lr_scheduler") is not None:
                    self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
                if self.scaler is not None and ckpt.get("scaler") is not None:
                    self.scaler.load_state_dict(ckpt["scaler"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint {path} does not fit these options (optimizer/scheduler): "
                                      f"{e}") from None
            if "rng" in ckpt:
                checkpoint.restore_rng_state(ckpt["rng"])
            self.start_epoch = int(ckpt["epoch"]) + 1
            self.max_accuracy = float(ckpt.get("max_accuracy", 0.0))
        print(f"resumed from {path} (last finished epoch {ckpt.get('epoch', '?')})")

    # ------------------------------------------------------------------------------- evaluation / timing
    def _set_toe_epoch(self, epoch: int) -> None:
        if self.cfg.toe is None:
            return
        import toe

        toe.set_epoch(self.model, epoch)  # every rank derives the stage from the epoch: they agree
        if self.model_ema is not None:
            toe.set_epoch(self.model_ema.module, epoch)

    def position(self) -> str:
        """Where the run is now, e.g. 'at epoch 3, iteration 12/500'."""
        if self.epoch_now is None:
            return "before the first epoch started"
        if self.evaluating:
            return f"at epoch {self.epoch_now}, during its evaluation"
        return f"at epoch {self.epoch_now}, iteration {self.train_loader.handed_out}/{len(self.train_loader)}"

    def _evaluate(self, epoch_label: str) -> Dict[str, Any]:
        self.evaluating = True
        reduce = self.placement.distributed and self.cfg.data.dist_eval
        stats = engine.evaluate(self.val_loader, self.model, self.device, self.amp_dtype,
                                reduce_across_ranks=reduce, header=f"eval {epoch_label}",
                                dynamic_batch=self.cfg.model.compile)
        result = {"test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "test_loss": stats["loss"],
                  "test_images": stats["n"]}
        if self.model_ema is not None:
            ema = engine.evaluate(self.val_loader, self.model_ema.module, self.ema_device, self.amp_dtype,
                                  reduce_across_ranks=reduce, header=f"eval EMA {epoch_label}")
            result["ema_test_acc1"] = ema["acc1"]
        self.evaluating = False
        return result

    def evaluate_only(self) -> int:
        ckpt = self.resume_ckpt
        if ckpt is not None:
            self._load_weights()
        epoch = int(ckpt.get("epoch", 0)) if ckpt is not None else self.start_epoch
        self._set_toe_epoch(epoch)
        if ckpt is None or ckpt.get("model_ema") is None:
            self.model_ema = None  # a fresh EMA copy would only repeat the model's numbers
        result = self._evaluate(f"of epoch {epoch}")
        result["n"] = result["test_images"]
        print(json.dumps(result))
        return 0

    def throughput(self) -> int:
        cfg = self.cfg
        if self.resume_ckpt is not None and "epoch" in self.resume_ckpt:
            # time the stage the resumed run is in: its next epoch
            self._load_weights()
            self.start_epoch = min(int(self.resume_ckpt["epoch"]) + 1, cfg.run.epochs - 1)
        self._set_toe_epoch(self.start_epoch)
        size = cfg.model.input_size
        forward = engine.measure_throughput(self.model, self.device, cfg.data.batch_size, size, self.amp_dtype)
        train = engine.measure_throughput(self.model, self.device, cfg.data.batch_size, size, self.amp_dtype,
                                          train=True)
        keep = cfg.toe.schedule.keep_rate(self.start_epoch) if cfg.toe is not None else 1.0
        print(json.dumps({"model": cfg.model.name, "batch_size": cfg.data.batch_size, "input_size": size,
                          "epoch": self.start_epoch, "eval_img_per_s": forward, "train_img_per_s": train,
                          "toe_keep_rate": keep}))
        return 0

    # ------------------------------------------------------------------------------------------ training
    def fit(self) -> int:
        cfg = self.cfg
        self._build_training()
        changes: Dict[str, Any] = {}
        if self.resume_ckpt is not None:
            changes = self._check_changes()  # the saved run's flags first: they name what changed
            self._load_weights()
            self._resume_training_state()
        self._open_outputs(changes)
        print(f"training epochs {self.start_epoch}..{cfg.run.epochs - 1} ({cfg.run.epochs - self.start_epoch} to go)")
        started = time.time()
        for epoch in range(self.start_epoch, cfg.run.epochs):
            self._begin_epoch(epoch)
            try:
                stats = engine.train_one_epoch(
                    self.model, self.criterion, self.train_loader, self.optimizer, self.device, epoch,
                    amp_dtype=self.amp_dtype, scaler=self.scaler, max_norm=cfg.optim.clip_grad,
                    model_ema=self.model_ema, mixup_fn=self.mixup_fn,
                    grad_accum_steps=cfg.run.grad_accum_steps // self._batch_scale(epoch),
                    set_training_mode=cfg.run.train_mode, print_freq=cfg.run.print_freq,
                    ema_source=self.plain_model, downsample=self._downsample(epoch),
                    on_update=self._update_hook(epoch))
            except engine.NonFiniteLossError as e:
                return self._non_finite(e)
            tokens = self._measured_tokens(epoch)
            evaluation = self._evaluate(f"after epoch {epoch}")
            self.lr_scheduler.step(epoch + 1, evaluation["test_acc1"])
            is_best = evaluation["test_acc1"] > self.max_accuracy
            self.max_accuracy = max(self.max_accuracy, evaluation["test_acc1"])
            row = self._log_row(epoch, stats, evaluation, tokens)
            self._record(epoch, row, is_best)
            distributed.barrier()  # no rank runs ahead of the checkpoint it may resume from
        if self.writer is not None:
            self.writer.close()
        hours = (time.time() - started) / 3600
        trained = cfg.run.epochs - self.start_epoch
        print(f"done: {trained} epoch{'' if trained == 1 else 's'} in {hours:.3f} h; best top-1 "
              f"{self.max_accuracy:.2f}%")
        return 0

    def _open_outputs(self, changes: Dict[str, Any]) -> None:
        out = self.cfg.run.output_dir
        self.writer = None
        self.log_path = os.path.join(out, "log.txt") if out else ""
        self.ckpt_path = os.path.join(out, "checkpoint.pth") if out else ""
        if not out or not self.placement.is_main:
            return
        from runtime.files import atomic_write_text

        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "args.json"), json.dumps(self.cfg.flags, indent=1, sort_keys=True) + "\n")
        runlog.truncate(self.log_path, self.start_epoch)
        saved_row = (self.resume_ckpt or {}).get("log_row")
        if isinstance(saved_row, dict) and not any(r.get("epoch") == saved_row.get("epoch")
                                                   for r in runlog.epoch_rows(self.log_path)):
            runlog.append(self.log_path, saved_row)  # the checkpoint's epoch line was lost in a crash
        if changes:
            runlog.append(self.log_path, {"resumed_with_changes": changes, "epoch": self.start_epoch})
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(out, "tb"), purge_step=self.start_epoch)

    def _begin_epoch(self, epoch: int) -> None:
        # an epoch's randomness depends only on (seed, rank, epoch): a resumed run reproduces it exactly
        seed = utils.epoch_seed(self.cfg.run.seed, self.placement.rank, epoch)
        utils.seed_everything(seed)
        self.loader_generator.manual_seed(seed)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self._make_train_loader(epoch)
        self._set_toe_epoch(epoch)
        self.epoch_now, self.evaluating = epoch, False

    def _measured_tokens(self, epoch: int) -> int:
        """Patch tokens after ToE in the last training forward (measured, not predicted)."""
        size = self._phase_size(epoch)
        patches = self.num_patches if size == self.cfg.model.input_size else (size // self.patch_size) ** 2
        if self.cfg.toe is None:
            return patches
        import toe

        index = toe.last_index(self.model)
        return int(index.shape[1]) - self.num_prefix if index is not None else patches

    def _log_row(self, epoch: int, stats: Dict[str, Any], evaluation: Dict[str, Any], tokens: int) -> Dict[str, Any]:
        cfg = self.cfg
        stage = cfg.toe.schedule.stage(epoch) if cfg.toe is not None else None
        flops = self.gflops.get(self._phase_size(epoch), {})
        row: Dict[str, Any] = {
            "train_loss": stats["loss"], "train_lr": stats["lr"], "toe_stage": stage,
            "toe_keep_rate": cfg.toe.schedule.keep_rate(epoch) if cfg.toe is not None else 1.0,
            "toe_tokens": tokens, "num_patches": self.num_patches, "train_input_size": self._phase_size(epoch),
            "epoch_time": stats["epoch_time"], "train_img_per_s": stats["img_per_s"], **evaluation,
            "max_accuracy": self.max_accuracy, "n_parameters": self.n_parameters,
            "gflops_per_iter": flops.get("per_stage", {}).get(stage, flops.get("baseline")),
            "epoch": epoch, "skipped_images": _skipped(self.train_set),
        }
        if cfg.curriculum is not None:
            row["aa_magnitude"] = cfg.curriculum.magnitude(epoch)
            row["micro_batch"] = cfg.data.batch_size * self._batch_scale(epoch)
            row["grad_accum_steps"] = cfg.run.grad_accum_steps // self._batch_scale(epoch)
        return row

    def _record(self, epoch: int, row: Dict[str, Any], is_best: bool) -> None:
        if not self.log_path or not self.placement.is_main:
            return
        runlog.append(self.log_path, row)  # the log line first, then the checkpoint (see module docstring)
        state = checkpoint.training_state(
            model=self.plain_model, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, scaler=self.scaler,
            model_ema=self.model_ema, epoch=epoch, config=self.cfg.flags, max_accuracy=self.max_accuracy,
            log_row=row)
        checkpoint.save(self.ckpt_path, state)
        if is_best:
            checkpoint.save(os.path.join(self.cfg.run.output_dir, "best_checkpoint.pth"), state)
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(_board_tag(key), value, epoch)
        self.writer.flush()

    def _non_finite(self, e: "engine.NonFiniteLossError") -> int:
        if self.ckpt_path and os.path.isfile(self.ckpt_path):
            where = (f"resume from {self.ckpt_path} (last completed epoch {checkpoint.epoch_of(self.ckpt_path)}) "
                     f"with --resume {self.ckpt_path}")
        else:
            where = "no checkpoint was written yet (restart from scratch)"
        return fail(f"non-finite loss ({e.value}) at epoch {e.epoch}, iteration {e.iteration}/{e.total}; {where}, "
                    f"e.g. with a lower --lr or --clip-grad", EXIT_NONFINITE)


def _change_text(flag: str, values: Any) -> str:
    """'--toe-r1 0.5 -> 0.6' for a changed flag [old, new]."""
    old, new = values

    def shown(v: Any) -> str:
        return v if isinstance(v, str) else repr(v)
    return f"--{flag.replace('_', '-')} {shown(old)} -> {shown(new)}"


def _skipped(dataset: Any) -> int:
    import datasets

    return int(datasets.skipped_images(dataset))


def _board_tag(key: str) -> str:
    """log.txt key -> TensorBoard tag grouped by its prefix (train/, test/, ema/, toe/)."""
    for prefix in ("train", "test", "ema", "toe"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return "misc/" + key


def gflops_by_size(model: torch.nn.Module, cfg: Any, sizes) -> Dict[int, Dict[str, Any]]:
    """toe.flops' GFLOPs per iteration (forward MACs x 3 x global batch) at each training size:
    {size: {'per_stage': {stage: gflops}, 'baseline': gflops}}; empty for models it cannot count."""
    from toe import flops

    table: Dict[int, Dict[str, Any]] = {}
    schedule = cfg.toe.schedule if cfg.toe is not None else None
    layer = cfg.toe.layer if cfg.toe is not None else 1
    for size in sizes:
        try:
            res = flops.gflops_per_iteration(model, schedule, layer=layer, batch_size=cfg.run.global_batch,
                                             img_size=size)
        except (ValueError, RuntimeError, TypeError) as e:
            print(f"warning: GFLOPs not counted for {cfg.model.name} at {size} px: {e}")
            return {}
        table[size] = {"per_stage": {int(s["stage"]): float(s["gflops"]) for s in res["stages"]},
                       "baseline": float(res["baseline"]["gflops"])}
    if cfg.model.input_size in table:
        base = table[cfg.model.input_size]
        print(f"GFLOPs per iteration at global batch {cfg.run.global_batch}: baseline {base['baseline']:.4g}, "
              f"per ToE stage {base['per_stage'] or '-'}")
    return table
