"""The run's safety infrastructure, below everything that trains: atomic files (files), the output folder and
its lock (rundir), log.txt rows (runlog), Ctrl-C / SIGTERM (interrupts), the user's errors and exit codes
(errors), progress lines (progress), process groups (distributed), checkpoints (checkpoint) and interleaved
step timing (steptime). Nothing here imports training/, config/ or main.py."""
