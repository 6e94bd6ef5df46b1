"""Slow steps for the real-scheduler tests (tests/test_slurm_cluster.py puts this folder on the jobs'
PYTHONPATH): with STEP_SLEEP=<seconds> set, every optimizer step of a job's first attempt sleeps that
long after it has run. A tiny run then lasts long enough for SLURM's signals to land mid-epoch without
burning CPU, and the attempt after a requeue runs at full speed. Sleeping changes when things happen,
never a number."""

import os

if os.environ.get("STEP_SLEEP") and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    import time

    from torch.optim.optimizer import register_optimizer_step_post_hook

    _seconds = float(os.environ["STEP_SLEEP"])
    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: time.sleep(_seconds))
