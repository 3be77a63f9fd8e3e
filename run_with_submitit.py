"""Submit main.py to SLURM with submitit; requeue from the job's last checkpoint on preemption/timeout.

    python run_with_submitit.py --nodes 2 --ngpus 8 --timeout 4320 --partition gpu \\
        --job_dir /checkpoint/$USER/toe/%j -- --model deit_small_patch16_224 --data-path /imagenet \\
        --batch-size 128 --toe-r1 0.5 --toe-ng 3 --toe-k 2

Flags before `--` are for SLURM; everything after it goes to main.py unchanged (the `--` may be left out
when no main.py flag collides with these). `%j` in --job_dir becomes the SLURM job id; main.py's
--output_dir defaults to that folder, so a requeued job finds its checkpoint.pth there.
"""
from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser("Submitit for ToE DeiT training", allow_abbrev=False)
    parser.add_argument("--ngpus", default=8, type=int, help="GPUs (tasks) per node")
    parser.add_argument("--nodes", default=1, type=int, help="number of nodes")
    parser.add_argument("--timeout", default=2880, type=int, help="job time limit in minutes")
    parser.add_argument("--job_dir", default="", type=str, help="job folder; %%j = job id "
                                                               "(default: ./submitit/%%j)")
    parser.add_argument("--partition", default="", type=str, help="SLURM partition")
    parser.add_argument("--use_volta32", action="store_true", help="request 32GB V100 GPUs")
    parser.add_argument("--comment", default="", type=str, help="SLURM comment")
    parser.add_argument("--cpus-per-task", default=10, type=int)
    parser.add_argument("--mem-per-gpu", default=None, type=int, help="GB of host memory per GPU")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        ours, rest = argv[:i], argv[i + 1:]
        args = parser.parse_args(ours)
    else:
        args, rest = parser.parse_known_args(argv)
    return args, rest


def _set_flag(argv: List[str], flag: str, value: str) -> List[str]:
    """Return argv with `flag value` set (replacing an existing `flag x` or `flag=x`)."""
    out: List[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = i + 1 < len(argv)
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out + [flag, value]


def _get_flag(argv: Sequence[str], flag: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


class Trainer:
    """The submitted callable: sets the torch.distributed environment from SLURM and runs main.main."""

    def __init__(self, main_argv: Sequence[str], job_dir: str) -> None:
        self.main_argv = list(main_argv)
        self.job_dir = job_dir

    def __call__(self) -> int:
        import main

        argv = self._argv_for_this_job()
        self._setup_distributed_env()
        code = main.main(argv)
        if code != 0:
            raise SystemExit(code)
        return code

    def checkpoint(self):
        """Called by submitit on preemption or timeout: resubmit, resuming from this job's checkpoint."""
        import submitit

        argv = self._argv_for_this_job()
        out = _get_flag(argv, "--output_dir")
        ckpt = os.path.join(out, "checkpoint.pth") if out else ""
        if ckpt and os.path.isfile(ckpt):
            argv = _set_flag(argv, "--resume", ckpt)
        print(f"requeuing with --resume {ckpt or 'auto (no checkpoint yet)'}", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(argv, self.job_dir))

    def _job_id(self) -> str:
        try:
            import submitit

            return str(submitit.JobEnvironment().job_id)
        except RuntimeError:  # not inside a submitit job (tests, local runs)
            return os.environ.get("SLURM_JOB_ID", "local")

    def _argv_for_this_job(self) -> List[str]:
        """main.py's argv with %j expanded and --output_dir defaulting to the job folder."""
        job_id = self._job_id()
        argv = [a.replace("%j", job_id) for a in self.main_argv]
        if _get_flag(argv, "--output_dir") is None:
            argv = _set_flag(argv, "--output_dir", self.job_dir.replace("%j", job_id))
        return argv

    @staticmethod
    def _setup_distributed_env() -> None:
        """torchrun-style variables from the SLURM task, read by distributed.launcher_placement."""
        try:
            import submitit

            env = submitit.JobEnvironment()
        except RuntimeError:
            return
        os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
        # a port derived from the job id: jobs sharing a node do not collide
        jid = str(env.job_id).split("_")[0]
        os.environ.setdefault("MASTER_PORT", str(20000 + int(jid) % 20000 if jid.isdigit() else 29500))
        os.environ["RANK"] = str(env.global_rank)
        os.environ["LOCAL_RANK"] = str(env.local_rank)
        os.environ["WORLD_SIZE"] = str(env.num_tasks)


# submitit resubmits a job that hit its time limit at most this many times (a preemption does not count)
REQUEUE_LIMIT = 30


def slurm_parameters(args: argparse.Namespace, job_name: str) -> Dict[str, Any]:
    """submitit executor parameters: one task per GPU on every node, SIGUSR1 two minutes before the limit
    so the job can requeue itself; optional SLURM settings only when given."""
    params: Dict[str, Any] = {"nodes": args.nodes, "gpus_per_node": args.ngpus, "tasks_per_node": args.ngpus,
                              "cpus_per_task": args.cpus_per_task, "timeout_min": args.timeout,
                              "slurm_signal_delay_s": 120, "name": job_name}
    optional = {"slurm_partition": args.partition, "slurm_comment": args.comment,
                "slurm_constraint": "volta32gb" if args.use_volta32 else None,
                "mem_gb": args.mem_per_gpu * args.ngpus if args.mem_per_gpu else None}
    params.update({key: value for key, value in optional.items() if value})
    return params


def main(argv: Optional[Sequence[str]] = None) -> int:
    import submitit

    from runtime.errors import UsageError
    from main import get_args_parser

    args, main_argv = parse_args(argv)
    try:  # a typo in main.py's flags should fail now, not after hours in the queue
        get_args_parser().parse_args(main_argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    job_dir = args.job_dir or str(Path("submitit") / "%j")
    Path(job_dir.replace("%j", "")).mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=job_dir, slurm_max_num_timeout=REQUEUE_LIMIT)
    executor.update_parameters(**slurm_parameters(args, job_name=f"toe-{uuid.uuid4().hex[:6]}"))
    job = executor.submit(Trainer(main_argv, job_dir))
    print(f"submitted job {job.job_id}: output and checkpoints in {job_dir.replace('%j', str(job.job_id))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
