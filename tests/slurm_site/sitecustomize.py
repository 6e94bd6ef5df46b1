"""Slow steps for the real-scheduler tests (tests/test_slurm_cluster.py puts this folder on the jobs'
PYTHONPATH): in a job's first attempt, with STEP_SLEEP=<seconds> every optimizer step sleeps that long
after it has run, and with STEP_WAIT_FOR=<path> every step waits until that file exists; with
PREDICT_SLEEP=<seconds> every forward pass of the network sleeps that long. A tiny run then lasts long
enough for SLURM's signals to land mid-epoch (or mid-folder), or for another job to start beside it,
without burning CPU, and the attempt after a requeue runs at full speed. Waiting changes when things
happen, never a number."""

import os

if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    if os.environ.get("STEP_SLEEP") or os.environ.get("STEP_WAIT_FOR"):
        import time

        from torch.optim.optimizer import register_optimizer_step_post_hook

        _seconds = float(os.environ.get("STEP_SLEEP") or 0)
        _wait_for = os.environ.get("STEP_WAIT_FOR")

        def _pause(optimizer, args, kwargs):
            time.sleep(_seconds)
            while _wait_for and not os.path.exists(_wait_for):
                time.sleep(0.2)

        register_optimizer_step_post_hook(_pause)

    if os.environ.get("PREDICT_SLEEP"):
        import time

        from torch.nn.modules.module import register_module_forward_hook

        _forward_sleep = float(os.environ["PREDICT_SLEEP"])

        def _slow_forward(module, args, output):
            if type(module).__name__ == "ImprovedUNet":  # the whole network, not each of its layers
                time.sleep(_forward_sleep)

        register_module_forward_hook(_slow_forward)
