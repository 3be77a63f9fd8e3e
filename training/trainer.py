"""Run a Config: build the pieces and resume (every check, before the output folder is claimed; see
training/preflight.py), then train epoch by epoch (or only evaluate / time).

The loop is Trainer.fit; each job it relies on is an object of its own: the curriculum plan
(training.curriculum_plan), the data (training.loaders), the model and its wrappers (training.run_model), the
resume check (training.resume), evaluation (training.evaluation) and the run record (training.record: the log
row first, the checkpoint second, so a resumed run continues bitwise as if never stopped).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import torch

import engine
import utils
from runtime import checkpoint, distributed, interrupts, rundir
from runtime.errors import EXIT_INTERRUPTED, UsageError, fail
from training import builders, evaluation, record, resume, runflops
from training.curriculum_plan import CurriculumPlan
from training.loaders import TrainData, build_eval_loader
from training.recipes import recipe_for
from training.run_model import RunModel

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def run(cfg: Any) -> int:
    """Train, evaluate (--eval) or time (--throughput) as ``cfg`` says; returns the exit code."""
    placement = distributed.start(cfg.run.device.startswith("cuda"), cfg.run.dist_url, cfg.run.local_rank)
    device = torch.device(f"cuda:{placement.local_rank}" if placement.distributed and
                          cfg.run.device.startswith("cuda") else cfg.run.device)
    lock, trainer = None, None
    try:
        from training import preflight

        # every check first (training/preflight.py): a refused command prints one line and creates or moves nothing
        preflight.check_early(cfg, placement)
        trainer = Trainer(cfg, placement, device)
        code, finished = 0, trainer.prepare()
        if finished:
            print(finished, flush=True)
        else:
            lock = preflight.claim_output_dir(cfg, placement, trainer.resume_stamp)
            trainer.announce()
            code = trainer.throughput() if cfg.run.throughput else trainer.evaluate_only() if cfg.run.eval_only \
                else trainer.fit()
    except Exception:
        if not interrupts.received():
            raise
        code = _interrupted(cfg, trainer, lock is not None)  # a peer's exit broke a collective: the same stop
    except KeyboardInterrupt:
        code = _interrupted(cfg, trainer, lock is not None)
    finally:
        if lock is not None:
            lock.release()
    if code != EXIT_INTERRUPTED:
        distributed.stop()
    return code


def _interrupted(cfg: Any, trainer: Optional["Trainer"], claimed: bool) -> int:
    """The one line of a Ctrl-C / SIGTERM: where the run stopped and how to continue it. ``claimed``: this run
    held its output folder (before that, it had written nothing)."""
    where = trainer.position() if trainer is not None else "before training started"
    ckpt = os.path.join(cfg.run.output_dir, "checkpoint.pth") if cfg.run.output_dir else ""
    if cfg.run.eval_only or cfg.run.throughput or not ckpt or not claimed:
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


class Trainer:
    """The training loop (fit) over the run's parts, plus the --eval and --throughput modes."""

    def __init__(self, cfg: Any, placement: distributed.Placement, device: torch.device) -> None:
        self.cfg, self.placement, self.device = cfg, placement, device
        self.amp_dtype = _AMP_DTYPES[cfg.run.amp]
        self.recipe = recipe_for(cfg)
        self.plan = CurriculumPlan(cfg.curriculum, cfg.model.input_size, cfg.data.aug, cfg.run.grad_accum_steps,
                                   cfg.run.curriculum_batch_scale)
        self.toe_on = cfg.toe is not None
        self.startup_lines: List[str] = []  # printed by announce(), once every check has passed
        self.resume_stamp = rundir.stamp(cfg.run.resume) if cfg.run.resume else None
        self.resume_ckpt = resume.read_resume(cfg.run.resume, cfg.run.eval_only)
        finetune = checkpoint.read(cfg.model.finetune) if cfg.model.finetune else None
        teacher_weights = checkpoint.read(cfg.distill.teacher_path) if cfg.distill.kind != "none" else None
        utils.seed_everything(cfg.run.seed)  # the same initial weights on every rank
        self.num_classes, val_loader = cfg.data.spec.fake_classes, None
        if not cfg.run.throughput:
            _, self.num_classes, val_loader = build_eval_loader(cfg.data, cfg.model.input_size, placement, device)
        self.evaluator = evaluation.Evaluator(val_loader, device, self.amp_dtype,
                                              placement.distributed and cfg.data.dist_eval, cfg.model.compile)
        self.net = self._build_model(None if finetune is None else checkpoint.model_weights(finetune))
        self.teacher = None if teacher_weights is None else builders.build_teacher(
            cfg.distill, self.num_classes, cfg.model.input_size, checkpoint.model_weights(teacher_weights), device)
        self.start_epoch, self.max_accuracy = cfg.run.start_epoch, 0.0
        self.epoch_now: Optional[int] = None  # the epoch being trained, for the stop line

    def _build_model(self, finetune_state: Optional[Dict[str, Any]]) -> RunModel:
        cfg = self.cfg
        extra = dict(self.recipe.model_kwargs())
        if cfg.curriculum is not None:
            extra["dynamic_img_size"] = True  # timm interpolates pos_embed to each phase's input size
        model, report = builders.build_model(cfg.model, cfg.toe, self.num_classes, extra, finetune_state,
                                             distilled_training=cfg.distill.kind != "none")
        if report is not None:
            self.startup_lines.append(f"fine-tuning from {cfg.model.finetune}: re-initialised "
                                      f"{report['dropped'] or 'no classifier'}"
                                      f"{'; pos_embed resampled' if report['resampled'] else ''}")
        self.gflops: runflops.Table = {}
        if not (cfg.run.eval_only or cfg.run.throughput):
            self.gflops, line = runflops.gflops_table(model, cfg)  # on CPU, before the move
            self.startup_lines.append(line)
        net = RunModel(model, cfg.model, self.placement.distributed, self.device)
        self.startup_lines.append(f"model {cfg.model.name}: {net.n_parameters} trainable parameters, "
                                  f"{net.num_patches} patches")
        return net

    def _build_training(self) -> None:
        cfg = self.cfg
        self.data = TrainData(self.recipe, self.plan, cfg.data, self.num_classes, cfg.run.seed, self.placement,
                              self.device, self.start_epoch)
        self.mixup_fn = builders.build_mixup(cfg.data.mixup, cfg.data.smoothing, self.num_classes) \
            if self.recipe.uses_mixup else None
        self.criterion = self.recipe.criterion(self.teacher, self.mixup_fn is not None)
        self.optimizer = builders.build_optimizer(self.net.plain, cfg.optim, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.updates_per_epoch = self.data.updates_per_epoch(cfg.run.grad_accum_steps)
        self.lr_scheduler = builders.build_scheduler(self.optimizer, cfg.optim,
                                                     cfg.run.schedule_epochs or cfg.run.epochs,
                                                     self.updates_per_epoch, cfg.run.seed)

    def _resume_check(self) -> resume.ResumeCheck:
        cfg = self.cfg
        return resume.ResumeCheck(self.resume_ckpt, cfg.run.resume, cfg.flags, cfg.run.resume_changed_ok,
                                  cfg.model.name)

    # ------------------------------------------------------------------------------------------ training
    def prepare(self) -> str:
        """What can still refuse the command, done before its output folder is claimed: the resumed weights,
        and for training the data, optimizer, schedule and the resumed run's flags and states. Returns the line
        for a resumed run with no epoch left to train ('' otherwise)."""
        cfg, ckpt = self.cfg, self.resume_ckpt
        if cfg.run.eval_only or cfg.run.throughput:
            if ckpt is not None and (cfg.run.eval_only or "epoch" in ckpt):
                self._resume_check().load_weights(self.net.plain, self.net.ema)
            return ""
        self._build_training()
        self.changes: Dict[str, Any] = {}
        if ckpt is not None:
            check = self._resume_check()
            self.changes = check.check_changes()  # the saved run's flags first: they name what changed
            check.load_weights(self.net.plain, self.net.ema)
            resumed = check.load_training_state(self.optimizer, self.lr_scheduler, self.scaler)
            if resumed is not None:
                self.start_epoch, self.max_accuracy = resumed
            self.startup_lines.extend(check.lines)
        if ckpt is None or self.start_epoch < cfg.run.epochs:
            return ""
        return rundir.finished_text(cfg.run.resume, self.start_epoch, cfg.run.epochs, self.max_accuracy)

    def announce(self) -> None:
        """The start-up lines, once the command has passed every check (and holds its output folder)."""
        cfg = self.cfg
        print(f"run: {self.placement.world_size} process(es) on {self.device}, amp {cfg.run.amp}, global batch "
              f"{cfg.run.global_batch}, lr {cfg.optim.lr:.4g}, data backend {cfg.data.backend}", flush=True)
        print(json.dumps(cfg.flags, sort_keys=True), flush=True)
        for line in self.startup_lines:
            print(line, flush=True)

    def fit(self) -> int:
        cfg = self.cfg
        self.record = record.RunRecord(cfg.run.output_dir, self.placement.is_main, cfg.flags)
        self.record.open(self.start_epoch, (self.resume_ckpt or {}).get("log_row"), self.changes)
        print(f"training epochs {self.start_epoch}..{cfg.run.epochs - 1} ({cfg.run.epochs - self.start_epoch} to go)")
        started = time.time()
        for epoch in range(self.start_epoch, cfg.run.epochs):
            self._begin_epoch(epoch)
            try:
                stats = self._train_epoch(epoch)
            except engine.NonFiniteLossError as e:
                return self.record.non_finite(e)
            self._end_epoch(epoch, stats)
            distributed.barrier()  # no rank runs ahead of the checkpoint it may resume from
        self.record.close()
        hours = (time.time() - started) / 3600
        trained = cfg.run.epochs - self.start_epoch
        print(f"done: {trained} epoch{'' if trained == 1 else 's'} in {hours:.3f} h; best top-1 "
              f"{self.max_accuracy:.2f}%")
        return 0

    def _begin_epoch(self, epoch: int) -> None:
        # an epoch's randomness depends only on (seed, rank, epoch): a resumed run reproduces it exactly
        seed = utils.epoch_seed(self.cfg.run.seed, self.placement.rank, epoch)
        utils.seed_everything(seed)
        self.data.start_epoch(epoch, seed)
        self.net.set_toe_epoch(epoch, self.toe_on)
        self.epoch_now = epoch

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        cfg = self.cfg
        return engine.train_one_epoch(
            self.net.model, self.criterion, self.data.loader, self.optimizer, self.device, epoch,
            amp_dtype=self.amp_dtype, scaler=self.scaler, max_norm=cfg.optim.clip_grad, model_ema=self.net.ema,
            mixup_fn=self.mixup_fn, grad_accum_steps=self.plan.accum_steps(epoch),
            set_training_mode=cfg.run.train_mode, print_freq=cfg.run.print_freq, ema_source=self.net.plain,
            downsample=self.plan.downsample(epoch), on_update=self._update_hook(epoch))

    def _update_hook(self, epoch: int):
        """--sched-on-updates: set the lr of the epoch's first update, and return the engine's per-update step.
        Indices restart from epoch x updates_per_epoch every epoch, so a resume, or a phase whose micro-batch
        layout gives one update more or less, stays on the same curve."""
        if not self.cfg.optim.sched_on_updates:
            return None
        first = epoch * self.updates_per_epoch
        self.lr_scheduler.step_update(first)
        return lambda done: self.lr_scheduler.step_update(first + done)

    def _end_epoch(self, epoch: int, stats: Dict[str, Any]) -> None:
        """Measure, evaluate, step the schedule, then record the epoch (log row, checkpoint, scalars)."""
        import datasets

        cfg, size = self.cfg, self.plan.size(epoch)
        tokens = self.net.measured_tokens(size, cfg.model.input_size, self.toe_on)
        result = self.evaluator(self.net.model, self.net.ema, self.net.ema_device, f"after epoch {epoch}")
        self.lr_scheduler.step(epoch + 1, result["test_acc1"])
        is_best = result["test_acc1"] > self.max_accuracy
        self.max_accuracy = max(self.max_accuracy, result["test_acc1"])
        row = record.epoch_row(
            epoch, stats, result, schedule=cfg.toe.schedule if self.toe_on else None, size=size, tokens=tokens,
            num_patches=self.net.num_patches, gflops=runflops.at_epoch(self.gflops, cfg, epoch), max_accuracy=self.max_accuracy,
            n_parameters=self.net.n_parameters, skipped_images=int(datasets.skipped_images(self.data.train_set)),
            curriculum_fields=self.plan.log_fields(epoch, cfg.data.batch_size))
        if self.record.writes:
            state = checkpoint.training_state(
                model=self.net.plain, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, scaler=self.scaler,
                model_ema=self.net.ema, epoch=epoch, config=cfg.flags, max_accuracy=self.max_accuracy, log_row=row)
            self.record.write(epoch, row, state, is_best)

    def position(self) -> str:
        """Where the run is now, e.g. 'at epoch 3, iteration 12/500'."""
        if self.epoch_now is None:
            return "before the first epoch started"
        if self.evaluator.running:
            return f"at epoch {self.epoch_now}, during its evaluation"
        return f"at epoch {self.epoch_now}, iteration {self.data.loader.handed_out}/{len(self.data.loader)}"

    # ------------------------------------------------------------------------------- evaluation / timing
    def evaluate_only(self) -> int:
        ckpt = self.resume_ckpt
        epoch = int(ckpt.get("epoch", 0)) if ckpt is not None else self.start_epoch
        self.net.set_toe_epoch(epoch, self.toe_on)
        if ckpt is None or ckpt.get("model_ema") is None:
            self.net.ema = None  # a fresh EMA copy would only repeat the model's numbers
        result = self.evaluator(self.net.model, self.net.ema, self.net.ema_device, f"of epoch {epoch}")
        result["n"] = result["test_images"]
        print(json.dumps(result))
        return 0

    def throughput(self) -> int:
        cfg = self.cfg
        if self.resume_ckpt is not None and "epoch" in self.resume_ckpt:
            # time the stage the resumed run is in: its next epoch (weights loaded by prepare)
            self.start_epoch = min(int(self.resume_ckpt["epoch"]) + 1, cfg.run.epochs - 1)
        self.net.set_toe_epoch(self.start_epoch, self.toe_on)
        size = cfg.model.input_size
        rates = evaluation.throughput(self.net.model, self.device, cfg.data.batch_size, size, self.amp_dtype)
        keep = cfg.toe.schedule.keep_rate(self.start_epoch) if self.toe_on else 1.0
        print(json.dumps({"model": cfg.model.name, "batch_size": cfg.data.batch_size, "input_size": size,
                          "epoch": self.start_epoch, **rates, "toe_keep_rate": keep}))
        return 0

