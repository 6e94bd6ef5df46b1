"""Training to a wall-clock budget (`train.py --minutes N`) and the cost estimate every run prints.

A student has a one-hour queue slot or a lunch break, not a number of epochs. With too many epochs a
cosine schedule is cut off at a high learning rate; with too few the slot is wasted. `Pace` times the
first training steps of a run, the end of an epoch (validation, checkpoint, curves) and from them:

- with a budget, decides how many steps fit; the decision goes into every checkpoint, so a preempted
  and resumed run follows the same schedule to the same last step as an uninterrupted one. At each
  epoch's end the plan is checked against the pace of the last three epochs and re-fitted when the
  budget would be missed by more than REPLAN_TOLERANCE and PACE_NOISE allow (a machine's speed drifts
  over a long run);
- without one, estimates how long the run will take, so a CPU run that will take hours says so (and
  what the CPU budget reaches) before the user has waited for it.

The plan is a plain dict (it is stored in checkpoints, summary.json and wandb):
    minutes, total_steps, step_seconds, epoch_end_seconds, decided_at_step,
    and once re-fitted, replans: [{at_step, from, to, step_seconds}, ...]
"""

from __future__ import annotations

import math
import os
import time

# The measurement window: WINDOW_STEPS steps after the first SKIP (which pay for allocation and kernel
# selection), or up to the end of the first epoch. A count of steps, not of seconds, so that every
# rank of a multi-GPU run closes its window at the same step (the plan is agreed on there).
SKIP = 3
WINDOW_STEPS = 12

# A budget run that falls this far behind its plan (a machine that got busier than it was while the
# steps were timed) ends at the budget instead, with the schedule not finished.
OVERRUN = 1.10

# A plan is re-fitted at an epoch's end when, at the pace of the last epochs, the run would end more than
# REPLAN_TOLERANCE of the budget away from it, and further than PACE_NOISE of the time left could explain.
# The pace of the first steps is not the pace of the whole run: 30-minute runs here drifted by up to 12% (either
# way) between their first and last epochs, and ended 4% under to 9% over with a plan made once. But the pace of three
# epochs also wobbles by a few percent on a shared machine: with the first term alone, a 30-minute run re-fitted
# 4775 -> 4670 steps at 6 minutes and back to 4777 at 10. The second term waits for a drift to outgrow the
# wobble; near the end, where the time left is short, the first decides (each re-fit bends the schedule).
REPLAN_TOLERANCE = 0.02
PACE_NOISE = 0.05


def fit_steps(budget_seconds: float, used_seconds: float, done_steps: int, step_seconds: float,
              epoch_end_seconds: float, steps_per_epoch: int, max_steps: int, ended_epochs: int = 0) -> int:
    """The most steps whose training plus one epoch end (validation, checkpoint) per started epoch fit in
    the budget, given `done_steps` already taken and `ended_epochs` epoch ends already paid in
    `used_seconds`; at least done_steps, at most max_steps.

    An epoch may end early at the budget: the run's last epoch is then a partial one, validated like
    the others.
    """
    best = done_steps
    epochs = math.ceil(max_steps / steps_per_epoch)
    for e in range(max(1, math.ceil(max(done_steps, 1) / steps_per_epoch)), epochs + 1):
        room = budget_seconds - used_seconds - (e - ended_epochs) * epoch_end_seconds  # left for steps with e epochs
        steps = min(e * steps_per_epoch, max_steps, done_steps + math.floor(max(room, 0.0) / step_seconds))
        if steps > (e - 1) * steps_per_epoch and steps > best:
            best = steps
    return best


class Pace:
    """The clock of a training run: measures its throughput and keeps its budget plan.

    `used_seconds` counts training and validation time across resumptions (the time of earlier sessions
    comes from the checkpoint); set-up, cache building and the final predictions are not counted.
    """

    def __init__(self, minutes: float, steps_per_epoch: int, max_steps: int, plan: dict | None = None,
                 used_seconds: float = 0.0):
        self.minutes = minutes
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.max_steps = max_steps  # --epochs x steps per epoch: the other limit
        self.plan = dict(plan) if plan else None
        self._used_before = used_seconds
        self._started = time.perf_counter()
        self._times: list[float] = []  # when each step of the measurement window ended
        # a plan stored by a run whose budget ran out before its steps were timed has no step time
        self.step_seconds: float | None = self.plan.get("step_seconds", 0.0) if self.plan else None
        self.end_seconds: float | None = None  # what the last epoch end of this session cost
        self._epoch_paces: list[float] = []  # seconds a step of each whole epoch timed under the plan

    @property
    def budgeted(self) -> bool:
        return self.minutes > 0

    @property
    def total_steps(self) -> int:
        """The step at which the run ends: the plan's, else --epochs' (also while still measuring)."""
        return self.plan["total_steps"] if self.plan else self.max_steps

    @property
    def measuring(self) -> bool:
        return self.step_seconds is None

    def used_seconds(self) -> float:
        return self._used_before + time.perf_counter() - self._started

    def restart(self) -> None:
        """Start this session's clock now (after set-up, when the first step begins)."""
        self._started = time.perf_counter()

    def observe(self, global_step: int, epoch_end_step: int, sync) -> bool:
        """Call after each training step while measuring; True when the window has just closed (then
        step_seconds is set). `sync` waits for the device, so each step's time is its real time.

        The step time is the median over the window: a burst of other work on the machine (a daemon,
        another user's job) lengthens a few steps and would otherwise shorten the whole plan.
        """
        if global_step < SKIP and global_step < epoch_end_step:
            return False
        sync()
        self._times.append(time.perf_counter())
        if len(self._times) <= WINDOW_STEPS and global_step < epoch_end_step:
            return False
        steps = sorted(b - a for a, b in zip(self._times, self._times[1:]))
        if steps:
            self.step_seconds = steps[len(steps) // 2]
        else:  # an epoch of at most SKIP steps: the only timing there is
            self.step_seconds = self.used_seconds() / max(global_step, 1)
        return True

    def decide(self, global_step: int, epoch_end_seconds: float) -> dict:
        """Fix the number of steps that fit in the budget (once; a resumed run keeps its plan)."""
        total = fit_steps(self.minutes * 60, self.used_seconds(), global_step, self.step_seconds,
                          epoch_end_seconds, self.steps_per_epoch, self.max_steps)
        self.plan = {"minutes": self.minutes, "total_steps": int(total), "step_seconds": round(self.step_seconds, 5),
                     "epoch_end_seconds": round(epoch_end_seconds, 4), "decided_at_step": int(global_step)}
        return self.plan

    def epoch_pace(self, step_seconds: float) -> float | None:
        """Note an epoch's seconds a step; the pace to plan with: the median of the last three epochs, which
        follows a drift within two epochs but not one epoch's burst of other work (None before three)."""
        self._epoch_paces.append(step_seconds)
        recent = sorted(self._epoch_paces[-3:])
        return recent[1] if len(recent) == 3 else None

    def replan(self, done_steps: int, step_seconds: float, epoch_end_seconds: float) -> bool:
        """At an epoch's end: re-fit the plan to the pace given (training seconds a step, from epoch_pace,
        and what an epoch end costs) when the run would otherwise end more than REPLAN_TOLERANCE
        of the budget, and more than PACE_NOISE of its time left, before or after it. True when the plan
        changed.

        A re-fit shortens or lengthens the run but never ends it on the spot: with no step left to fit,
        the learning rate would stop undecayed, so the plan stands and the OVERRUN safety net decides.
        """
        if not (self.budgeted and self.plan) or self.plan.get("overrun") or done_steps >= self.total_steps:
            return False
        budget_seconds, used = self.minutes * 60, self.used_seconds()
        ends_left = math.ceil(self.total_steps / self.steps_per_epoch) - done_steps // self.steps_per_epoch
        projected = used + (self.total_steps - done_steps) * step_seconds + ends_left * epoch_end_seconds
        if abs(projected - budget_seconds) <= max(REPLAN_TOLERANCE * budget_seconds, PACE_NOISE * (projected - used)):
            return False
        total = fit_steps(budget_seconds, used, done_steps, step_seconds, epoch_end_seconds, self.steps_per_epoch,
                          self.max_steps, ended_epochs=done_steps // self.steps_per_epoch)
        if total <= done_steps or total == self.total_steps:
            return False
        replans = self.plan.get("replans", []) + [{"at_step": int(done_steps), "from": self.total_steps,
                                                    "to": int(total), "step_seconds": round(step_seconds, 5)}]
        self.plan = {**self.plan, "total_steps": int(total), "replans": replans}
        return True

    def measured_pace(self, done_steps: int, timed_steps: int, seconds: float) -> float | None:
        """An epoch's measurement for replan: the pace to plan with (epoch_pace), or None. Only an epoch of at
        least WINDOW_STEPS steps trained whole under a plan decided before it counts (the first epoch
        includes the timing window and its probe)."""
        decided = self.plan.get("decided_at_step", done_steps) if self.plan else done_steps
        if timed_steps < WINDOW_STEPS or decided >= done_steps - timed_steps:
            return None
        return self.epoch_pace(seconds / timed_steps)

    def line(self, epoch_end_seconds: float) -> str:
        """The line a run prints once its --minutes plan is decided."""
        plan = self.plan
        return (f"budget {self.minutes:g} min: {plan['step_seconds'] * 1000:.0f} ms a step and "
                f"{epoch_end_seconds:.1f} s an epoch end measured -> {plan['total_steps']} steps "
                f"({plan['total_steps'] / self.steps_per_epoch:.1f} epochs), the learning-rate schedule fitted to them")

    def replan_line(self) -> str:
        """The line a run prints when its plan was re-fitted."""
        last = self.plan["replans"][-1]
        return (f"budget {self.minutes:g} min: {last['step_seconds'] * 1000:.0f} ms a step in the last epochs "
                f"(planned {self.plan['step_seconds'] * 1000:.0f}) -> {last['to']} steps instead of "
                f"{last['from']}, the learning-rate schedule re-fitted to them")

    def summary(self, epochs_done: int) -> dict | None:
        """For summary.json: the budget, the time used and the steps planned against the steps done (None
        without --minutes)."""
        if not self.budgeted:
            return None
        plan = self.plan or {}
        return {"minutes": self.minutes, "used_minutes": round(self.used_seconds() / 60, 3),  # the budget's own clock
                "planned_steps": plan.get("planned_steps", plan.get("total_steps")),
                "done_steps": min(self.total_steps, epochs_done * self.steps_per_epoch),
                "step_seconds": plan.get("step_seconds"), "epoch_end_seconds": plan.get("epoch_end_seconds"),
                "overrun": bool(plan.get("overrun")), "replans": plan.get("replans", [])}

    def estimate_seconds(self, epoch_end_seconds: float, done_steps: int) -> float:
        """Training plus validation time of the whole run from what was measured."""
        remaining = max(self.total_steps - done_steps, 0)
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        return self.used_seconds() + remaining * self.step_seconds + epochs * epoch_end_seconds

    def overrun(self) -> bool:
        """True when a budget run is so far behind its plan that it must end now."""
        return self.budgeted and self.used_seconds() > OVERRUN * self.minutes * 60

    def describe(self, done_steps: int) -> str:
        """'budget 3.2/10 min, step 540/1010' for the progress line and the epoch summary."""
        text = f"step {done_steps}/{self.total_steps}"
        if self.budgeted:
            text = f"budget {self.used_seconds() / 60:.1f}/{self.minutes:g} min, " + text
        return text


def slurm_seconds_left(now: float | None = None) -> float | None:
    """Seconds until the SLURM job's time limit (SLURM_JOB_END_TIME, a Unix time), or None outside a job."""
    end = os.environ.get("SLURM_JOB_END_TIME")
    try:
        return float(end) - (time.time() if now is None else now) if end else None
    except ValueError:
        return None


def format_minutes(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


# What a 2-core CPU reaches in a short budget (results/budgets.csv); printed when a CPU run will take long.
CPU_BUDGET_COMMAND = "python train.py --data-dir DATA --minutes 10 --image-size 96"
CPU_BUDGET_REACHES = "test Dice 0.90 on ISIC 2018 with 2 CPU cores that have bf16, 0.89 without"


def cost_warning(estimate_seconds: float, on_cpu: bool, epochs: int, image_size: int, data_dir: str) -> str | None:
    """A warning, printed before the run has cost much, when it will take long on this machine: over an
    hour on a CPU, or longer than the SLURM job has left (then the job requeues to finish)."""
    lines = []
    if on_cpu and estimate_seconds > 3600:
        lines.append(f"warning: this run is estimated to take {format_minutes(estimate_seconds)} on this CPU "
                     f"({epochs} epochs at {image_size}px). For a short CPU budget use "
                     f"`{CPU_BUDGET_COMMAND.replace('DATA', data_dir)}` ({CPU_BUDGET_REACHES}); training goes on.")
    left = slurm_seconds_left()
    if left is not None and estimate_seconds > left:
        lines.append(f"note: this run is estimated to take {format_minutes(estimate_seconds)}, longer than the "
                     f"{format_minutes(max(left, 0))} this SLURM job has left; it will save at the time-limit "
                     f"warning and be requeued to finish (slurm/train.sh requeues itself).")
    return "\n".join(lines) or None
