"""One run per output folder, and no run silently replaced.

Before a training run writes anything, rank 0 takes an exclusive ``fcntl.flock`` on ``<output_dir>/.lock``
(which names its host and pid) and keeps it until the run ends, then removes the file; the OS drops the lock
when the holder dies, so a killed run never blocks the next one. Holding the lock, it refuses a fresh start over an
earlier run (a checkpoint or a non-empty log.txt), unless ``--overwrite`` asked for one: then the earlier
run's files are moved into ``<output_dir>/old-<time>/``, never deleted. The lock is taken only after every
check of the command has passed (training/preflight.py), so a refused command moves nothing; :func:`probe`
gives the lock's refusals early, without taking it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import List, Optional

from runtime.errors import UsageError

LOCK_FILE = ".lock"
# everything a training run writes into its folder; --overwrite moves exactly these aside
RUN_ENTRIES = ("checkpoint.pth", "best_checkpoint.pth", "log.txt", "args.json", "tb")


class FolderLock:
    """An flock held on ``<folder>/.lock`` until :meth:`release` or the end of the process."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd: Optional[int] = None
        while self._fd is None:
            try:
                os.makedirs(folder, exist_ok=True)  # creating an empty folder replaces nothing
                # no O_TRUNC: the holder's host and pid must stay readable for the run that is refused
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UsageError(f"cannot write to --output_dir {folder}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UsageError(f"cannot lock --output_dir {folder}: {e}") from None
                raise UsageError(_live_run(folder, holder)) from None
            if self._same_file(fd):
                self._fd = fd
            else:  # the holder removed the file between our open and flock: lock the new one
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _holder(self) -> str:
        return _read_holder(self.path)

    def release(self) -> None:
        """Remove the lock file (still holding it, so no other run can lock the removed file unnoticed) and
        drop the lock. A killed holder leaves the file behind, unlocked; the next run reuses it."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(path: str) -> str:
    """The host and pid a lock file names ('' when unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " ".join(f.read().split())
    except OSError:
        return ""


def _live_run(folder: str, holder: str) -> str:
    return (f"another run is writing to --output_dir {folder} ({holder or 'holder unknown'}); wait for it or "
            f"stop it, or choose another --output_dir")


def earlier_run(folder: str) -> List[str]:
    """What makes ``folder`` hold a run that a fresh start would replace: its checkpoints, and log.txt
    when it has any content."""
    found = [name for name in ("checkpoint.pth", "best_checkpoint.pth")
             if os.path.exists(os.path.join(folder, name))]
    log = os.path.join(folder, "log.txt")
    if os.path.isfile(log) and os.path.getsize(log) > 0:
        found.append("log.txt")
    return found


def move_aside(folder: str) -> Optional[str]:
    """Move the RUN_ENTRIES present in ``folder`` into a new ``old-<time>/`` inside it; returns that folder
    (None when there was nothing to move)."""
    present = [name for name in RUN_ENTRIES if os.path.lexists(os.path.join(folder, name))]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = os.path.join(folder, f"old-{stamp}"), 1
    while os.path.lexists(target):
        n += 1
        target = os.path.join(folder, f"old-{stamp}-{n}")
    os.makedirs(target)
    for name in present:
        os.replace(os.path.join(folder, name), os.path.join(target, name))  # same file system: a rename
    return target


def _continues_this_folder(folder: str, resume: str) -> bool:
    """Resuming from the folder's own checkpoint.pth continues the run it holds."""
    own = os.path.join(folder, "checkpoint.pth")
    return bool(resume) and os.path.exists(own) and os.path.exists(resume) and os.path.samefile(resume, own)


def stamp(path: str) -> Optional[tuple]:
    """What identifies the file at ``path`` now (inode, size, modification time), or None when absent: a
    checkpoint read before the folder was locked must be the one the lock finds."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _replaced_run(folder: str, resume: str) -> Optional[str]:
    """The refusal of a start that would replace the run ``folder`` holds, or None."""
    found = earlier_run(folder)
    if found and not _continues_this_folder(folder, resume):
        start = f"resuming from {resume}" if resume else "a fresh start"
        return (f"--output_dir {folder} already holds a run ({', '.join(found)}) that {start} would replace; "
                f"continue it with --resume auto, start over with --overwrite (moves its files to "
                f"{os.path.join(folder, 'old-<time>')}), or choose another --output_dir")
    return None


def probe(folder: str, resume: str, overwrite: bool) -> None:
    """The refusals of :func:`claim` that can be known without taking the lock, creating or moving anything:
    a live run holds ``folder``, or a fresh start would replace its run. Raises UsageError."""
    if not os.path.isdir(folder):
        return
    path = os.path.join(folder, LOCK_FILE)
    if os.path.isfile(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at once: only asks whether it is held
        except OSError:
            raise UsageError(_live_run(folder, _read_holder(path))) from None
        finally:
            os.close(fd)
    problem = None if overwrite else _replaced_run(folder, resume)
    if problem:
        raise UsageError(problem)


def claim(folder: str, resume: str, overwrite: bool, resume_stamp: Optional[tuple] = None) -> FolderLock:
    """Lock ``folder`` for this run and make sure starting it replaces nothing; returns the held lock.
    ``resume``: the checkpoint this run continues ('' for a fresh start), as :func:`stamp` found it when it was
    read (``resume_stamp``). Raises UsageError (lock released)."""
    lock = FolderLock(folder)
    try:
        if resume and resume_stamp is not None and stamp(resume) != resume_stamp:
            raise UsageError(f"{resume} changed while this run was starting (another run wrote it); rerun the "
                             f"command to continue from the new checkpoint")
        if overwrite:
            moved = move_aside(folder)
            if moved:
                print(f"--overwrite: moved the earlier run's files to {moved}", flush=True)
            return lock
        problem = _replaced_run(folder, resume)
        if problem:
            raise UsageError(problem)
    except BaseException:
        lock.release()
        raise
    return lock


def finished_text(resume: str, trained: int, epochs: int, best_top1: float) -> str:
    """The line for a resume of ``resume`` (``trained`` epochs done) that has nothing left of ``epochs``."""
    folder = os.path.dirname(os.path.abspath(resume))
    results = [os.path.join(folder, name) for name in ("log.txt", "best_checkpoint.pth")
               if os.path.isfile(os.path.join(folder, name))]
    done = f"epoch {trained} of {epochs}" if trained == epochs else f"{trained} epochs, more than --epochs {epochs}"
    return (f"already finished: {resume} holds {done} (best top-1 {best_top1:.2f}%); its results are in "
            f"{', '.join(results or [resume])}. Nothing was trained or written: give a larger --epochs to train "
            f"on, or --eval to evaluate it")
