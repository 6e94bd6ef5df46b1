"""--minutes (a wall-clock budget), the cost estimate a run prints, and --ema (an average of the weights)."""

import csv
import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import budget
import checkpoint
import devices
import losses
import predict
import train
import utils
from conftest import ROOT, clean_environ, write_isic_folder
from test_train import assert_same_weights, tiny_args, weights


# ----------------------------------------------------------------------------- the plan


def test_fit_steps_leaves_room_for_every_epoch_end():
    # 100 s, 1 s a step, 10 s an epoch end, 30 steps an epoch: 70 steps (two full epochs and 10 steps of a
    # third) cost 70 + 3 x 10 = 100 s; 71 steps would not fit, nor would a fourth epoch
    assert budget.fit_steps(100, 0, 0, 1.0, 10.0, 30, 10_000) == 70
    assert budget.fit_steps(100, 0, 0, 1.0, 0.0, 30, 10_000) == 100


def test_fit_steps_counts_what_was_spent_and_stops_at_the_epoch_limit():
    assert budget.fit_steps(100, 40, 10, 1.0, 10.0, 30, 10_000) == 10 + 40  # 40 s left after 2 epoch ends: 20 + ...
    assert budget.fit_steps(10_000, 0, 0, 1.0, 10.0, 30, 90) == 90  # --epochs 3 ends the run first
    assert budget.fit_steps(5, 30, 12, 1.0, 10.0, 30, 10_000) == 12  # already past the budget: stop where it is


def test_fit_steps_counts_only_the_epoch_ends_still_to_come():
    # one epoch (30 steps and its end) paid in 40 s: the 60 s left hold two more epoch ends and 40 steps
    assert budget.fit_steps(100, 40, 30, 1.0, 10.0, 30, 10_000, ended_epochs=1) == 70
    assert budget.fit_steps(100, 40, 30, 1.0, 10.0, 30, 10_000) == 60  # charging the paid end again loses 10 steps


def planned_pace(used_seconds: float) -> budget.Pace:
    """A one-minute run 40 steps (4 epochs) into a plan of 100 steps at 0.5 s a step."""
    plan = {"minutes": 1.0, "total_steps": 100, "step_seconds": 0.5, "epoch_end_seconds": 0.0, "decided_at_step": 5}
    return budget.Pace(minutes=1.0, steps_per_epoch=10, max_steps=10_000, plan=plan, used_seconds=used_seconds)


def test_a_plan_is_refitted_to_the_last_epochs_pace_when_the_budget_would_be_missed():
    slower = planned_pace(19.9)  # 60 steps left at 0.8 s would end at 67.9 s of 60
    assert slower.replan(40, 0.8, 0.0) and slower.total_steps == 40 + 50  # 40.1 s left / 0.8 s
    assert slower.plan["replans"] == [{"at_step": 40, "from": 100, "to": 90, "step_seconds": 0.8}]
    assert slower.plan["step_seconds"] == 0.5  # the first measurement stays on record
    faster = planned_pace(19.9)
    assert faster.replan(40, 0.25, 0.0) and faster.total_steps == 40 + 160
    on_time = planned_pace(19.9)  # 19.9 + 60 x 0.66 = 59.5 s: within REPLAN_TOLERANCE, no re-fit
    assert not on_time.replan(40, 0.66, 0.0) and on_time.total_steps == 100 and "replans" not in on_time.plan
    late = planned_pace(59.9)  # no step fits any more: ending here would leave the lr undecayed
    assert not late.replan(40, 0.8, 0.0) and late.total_steps == 100


def test_a_miss_the_pace_wobble_could_explain_waits_while_much_time_is_left():
    # both would end 1.6 s (2.7%) before the budget: with 38.5 s to go that is within 5% of it, with 6 s it is not
    early = planned_pace(19.9)
    assert not early.replan(40, 0.6417, 0.0) and early.total_steps == 100
    late = planned_pace(52.4)
    assert late.replan(90, 0.6, 0.0) and late.total_steps == 90 + 12  # 7.6 s left / 0.6 s


def test_the_pace_to_plan_with_follows_a_drift_but_not_one_epochs_burst():
    pace = planned_pace(0.0)
    assert [pace.epoch_pace(s) for s in (0.50, 0.90, 0.51, 0.52)] == [None, None, 0.51, 0.52]  # the burst never counts
    drift = planned_pace(0.0)
    assert [drift.epoch_pace(s) for s in (0.50, 0.55, 0.56, 0.57)] == [None, None, 0.55, 0.56]


def test_pace_measures_a_window_of_steps_then_decides():
    pace = budget.Pace(minutes=1.0, steps_per_epoch=100, max_steps=10_000)
    assert pace.measuring and pace.total_steps == 10_000
    closed = [step for step in range(1, 40) if pace.measuring and pace.observe(step, 100, sync=lambda: None)]
    assert closed == [budget.SKIP + budget.WINDOW_STEPS]
    assert pace.step_seconds > 0
    plan = pace.decide(closed[0], epoch_end_seconds=1.0)
    assert plan["total_steps"] == pace.total_steps and closed[0] <= plan["total_steps"] <= 10_000
    assert set(plan) >= {"minutes", "total_steps", "step_seconds", "epoch_end_seconds"}


def test_a_short_first_epoch_closes_the_window_at_its_end():
    pace = budget.Pace(minutes=1.0, steps_per_epoch=2, max_steps=100)
    assert not pace.observe(1, 2, sync=lambda: None)
    assert pace.observe(2, 2, sync=lambda: None) and pace.step_seconds > 0


def test_cosine_schedule_ends_at_the_planned_step():
    config = train.TrainConfig(lr=1.0, schedule="cosine", warmup_epochs=0.0, epochs=100, minutes=1)
    pace = budget.Pace(1, steps_per_epoch=10, max_steps=1000, plan={"total_steps": 25, "step_seconds": 0.1})
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = train.make_scheduler(optimizer, config, 10, pace)
    lrs = []
    for _ in range(25):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 1.0 and lrs[12] == pytest.approx(0.5, abs=0.07) and 0 < lrs[-1] < 0.01
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- --minutes end to end


def test_budget_run_ends_near_its_minutes_with_its_plan_carried_out(tmp_path, capsys):
    """End to end: the run plans its steps from its first ones, carries the plan out and decays the schedule
    by the end. How close the clock comes to the budget is a figure of the machine, reported by study.py
    (results/budgets.csv, train_minutes); here only a planner that ignores the budget must fail."""
    minutes = 0.3
    data = write_isic_folder(tmp_path / "isic", n=48)  # epochs long enough that steps, not epoch ends, fill them
    meter = utils.OtherCpu()
    summary = train.main(tiny_args(data, tmp_path, "--minutes", str(minutes), "--epochs", "1000",
                                   "--batch-size", "1", "--name", "budget"))
    other = meter.share()
    if other is not None and other > 0.1:  # a wall-clock budget on a shared CPU measures the other work too
        pytest.skip(f"other processes took {other:.0%} of the CPU during the run; the budget cannot be judged")
    run = tmp_path / "budget"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    plan = summary["budget"]
    used = plan["used_minutes"] * 60  # training, validation, checkpoints and curves, by the budget's clock
    assert 0.5 * minutes * 60 <= used <= 1.5 * minutes * 60, (used, len(rows))
    # the plan carried out, or the safety net: a run past OVERRUN times its budget stops where it is
    assert plan["planned_steps"] > 0
    assert plan["done_steps"] == plan["planned_steps"] if not plan["overrun"] else used > budget.OVERRUN * minutes * 60
    assert plan["minutes"] == minutes and used >= sum(float(r["seconds"]) for r in rows)
    # the decision is stored where a resumed run and a reader find it
    assert checkpoint.load_checkpoint(run / "last.pt")["budget_plan"]["total_steps"] == plan["planned_steps"]
    assert json.loads((run / "config.json").read_text())["budget_plan"]["total_steps"] == plan["planned_steps"]
    out = capsys.readouterr().out
    assert f"budget {minutes:g} min:" in out
    if not plan["overrun"]:
        assert float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-9)  # the schedule decayed fully by the budget
        assert f"step {plan['planned_steps']}/{plan['planned_steps']}" in out


def test_a_run_that_slows_down_refits_its_plan_instead_of_running_over(tmp_path, monkeypatch, capsys):
    """From the end of its first epoch on, every step of the run costs 40 ms more (another job started on
    the machine): the plan made from the first steps no longer fits, and the run re-fits it at an epoch's
    end, carries the new plan out and decays its schedule, instead of running into the OVERRUN net."""
    data = write_isic_folder(tmp_path / "isic", n=48)  # 30 training images: 30 steps an epoch
    ended, end_epoch = [], train.end_epoch
    monkeypatch.setattr(train, "end_epoch", lambda *a, **k: ended.append(1) or end_epoch(*a, **k))
    loss = losses.SegmentationLoss.forward

    def slowed(self, *args):
        if ended:
            time.sleep(0.04)
        return loss(self, *args)
    monkeypatch.setattr(losses.SegmentationLoss, "forward", slowed)
    meter = utils.OtherCpu()
    summary = train.main(tiny_args(data, tmp_path, "--minutes", "0.3", "--epochs", "1000",
                                   "--batch-size", "1", "--name", "slowed"))
    other = meter.share()
    if other is not None and other > 0.1:  # slowed from the start, the run cannot be told from a slowed-down one
        pytest.skip(f"other processes took {other:.0%} of the CPU during the run")
    plan = summary["budget"]
    assert plan["replans"] and plan["replans"][0]["to"] < plan["replans"][0]["from"], plan
    assert plan["replans"][0]["at_step"] >= 4 * 30  # three whole epochs timed under the plan: the fourth one's end
    assert not plan["overrun"] and plan["done_steps"] == plan["planned_steps"] == plan["replans"][-1]["to"]
    rows = list(csv.DictReader(open(tmp_path / "slowed" / "metrics.csv")))
    assert float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-9)
    stored = checkpoint.load_checkpoint(tmp_path / "slowed" / "last.pt")["budget_plan"]
    assert stored["total_steps"] == plan["planned_steps"] and stored["replans"] == plan["replans"]
    first = plan["replans"][0]
    assert f"-> {first['to']} steps instead of {first['from']}, the learning-rate schedule re-fitted" in capsys.readouterr().out


SLOWED_AFTER_FIRST_EPOCH = """
import sys, time
sys.path.insert(0, {root!r})
import losses, train
ended, end_epoch, loss = [], train.end_epoch, losses.SegmentationLoss.forward
train.end_epoch = lambda *a, **k: ended.append(1) or end_epoch(*a, **k)
losses.SegmentationLoss.forward = lambda self, *a: (time.sleep(0.04) if ended else None) or loss(self, *a)
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_two_ranks_that_slow_down_refit_one_plan_and_stop_together(tmp_path):
    """torchrun with 2 gloo processes, slowed as above: rank 0's re-fit reaches both ranks (they must take
    their last step together, or the run would hang in an all-reduce) and the run ends on its new plan."""
    data = write_isic_folder(tmp_path / "isic", n=48)
    script = tmp_path / "slowed_train.py"
    script.write_text(SLOWED_AFTER_FIRST_EPOCH.format(root=str(ROOT)))
    args = tiny_args(data, tmp_path, "--minutes", "0.3", "--epochs", "1000", "--batch-size", "1", "--name", "ddp")
    env = {**clean_environ(), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    meter = utils.OtherCpu()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    other = meter.share()
    if other is not None and other > 0.1:
        pytest.skip(f"other processes took {other:.0%} of the CPU during the run")
    plan = json.loads((tmp_path / "ddp" / "summary.json").read_text())["budget"]
    assert plan["replans"] and not plan["overrun"] and plan["done_steps"] == plan["planned_steps"], plan
    assert result.stdout.count("the learning-rate schedule re-fitted") == len(plan["replans"])  # rank 0 says it


def test_epochs_end_a_budget_run_that_has_time_left(isic_folder, tmp_path):
    summary = train.main(tiny_args(isic_folder, tmp_path, "--minutes", "60", "--epochs", "2", "--name", "short"))
    assert summary["budget"]["done_steps"] == summary["budget"]["planned_steps"]
    assert len(list(csv.DictReader(open(tmp_path / "short" / "metrics.csv")))) == 2


def signal_after(polls: int):
    """A Preemption class whose signal 'arrives' at the polls-th step check (as SLURM's USR1 would)."""
    left = [polls]

    class SignalAfter(train.Preemption):
        def poll(self, distributed, device, overrun=False, loss_sum=None):
            left[0] -= 1
            if left[0] == 0:
                self.signum = 10  # SIGUSR1
            return super().poll(distributed, device, overrun, loss_sum)
    return SignalAfter


@pytest.mark.parametrize("ema", [None, "0.9"])
def test_preempted_budget_run_resumes_to_the_uninterrupted_weights(isic_folder, tmp_path, monkeypatch, ema):
    """The plan is decided once and stored: a run stopped mid-epoch and resumed follows it to the same last
    step and the same weights, even where a new measurement would plan otherwise."""
    plain = train.Preemption
    planned = iter([23, 23, 5])  # uninterrupted, preempted, (a re-decision on resume must not happen)
    monkeypatch.setattr(budget, "fit_steps", lambda *a, **k: next(planned))
    extra = ["--minutes", "5", "--epochs", "1000", "--batch-size", "1"] + (["--ema", ema] if ema else [])
    whole = train.main(tiny_args(isic_folder, tmp_path, *extra, "--name", "whole"))
    assert whole["budget"]["done_steps"] == 23

    monkeypatch.setattr(train, "Preemption", signal_after(17))  # epoch 2, step 5 (11 steps and one end-of-epoch poll in epoch 1)
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_args(isic_folder, tmp_path, *extra, "--name", "cut"))
    assert stopped.value.code == 128 + 10
    state = checkpoint.load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 5) and state["budget_plan"]["total_steps"] == 23

    monkeypatch.setattr(train, "Preemption", plain)
    resumed = train.main(tiny_args(isic_folder, tmp_path, *extra, "--name", "cut", "--resume", "auto"))
    assert resumed["budget"]["planned_steps"] == 23
    assert_same_weights(weights(tmp_path / "whole" / "last.pt"), weights(tmp_path / "cut" / "last.pt"))
    if ema:
        saved = checkpoint.load_checkpoint(tmp_path / "cut" / "last.pt")
        assert_same_weights(checkpoint.load_checkpoint(tmp_path / "whole" / "last.pt")["online_model"],
                            saved["online_model"])


# ----------------------------------------------------------------------------- the cost estimate


def test_a_long_cpu_run_says_what_it_will_cost_and_what_the_budget_command_reaches():
    run = dict(epochs=100, image_size=256, data_dir="data/ISIC2018")
    warning = budget.cost_warning(26 * 3600, True, **run)
    assert "26.0 h" in warning and "--minutes" in warning and budget.CPU_BUDGET_REACHES in warning
    assert "--data-dir data/ISIC2018 --minutes 10" in warning and "training goes on" in warning
    assert budget.cost_warning(40 * 60, True, **run) is None
    assert budget.cost_warning(26 * 3600, False, **run) is None  # a GPU run outside SLURM


def test_a_gpu_run_longer_than_its_slurm_job_says_it_will_be_requeued(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(__import__("time").time()) + 3600))
    run = dict(epochs=100, image_size=256, data_dir="data/ISIC2018")
    note = budget.cost_warning(3 * 3600, False, **run)
    assert "requeued" in note and "3.0 h" in note
    assert budget.cost_warning(30 * 60, False, **run) is None


def test_the_estimate_is_printed_before_the_first_epoch_ends(isic_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget.Pace, "estimate_seconds", lambda self, end, done: 5 * 3600.0)
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--batch-size", "1", "--name", "long"))
    out = capsys.readouterr().out
    assert "estimated to take 5.0 h on this CPU" in out
    assert out.index("estimated to take") < out.index("epoch   1")


# ----------------------------------------------------------------------------- --ema


def test_weight_average_follows_the_formula_with_its_warm_up():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = train.WeightAverage(model, decay=0.5)
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(2.0)
    average.update()  # first update: decay min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(average.model[0].weight, d * before + (1 - d) * model[0].weight)
    assert torch.allclose(average.model[1].running_mean, torch.full((2,), (1 - d) * 2.0))
    assert average.model[1].num_batches_tracked == model[1].num_batches_tracked
    assert not any(p.requires_grad for p in average.model.parameters())


def test_ema_run_saves_the_average_as_the_model_predict_uses(isic_folder, tmp_path):
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--ema", "0.9", "--name", "ema"))
    best = checkpoint.load_checkpoint(tmp_path / "ema" / "best.pt")
    assert best["ema_updates"] > 0 and best["train_config"]["ema"] == 0.9
    differs = [k for k in best["model"] if not torch.equal(best["model"][k], best["online_model"][k])]
    assert differs, "the average should differ from the trained weights"
    model, *_ = checkpoint.model_from_checkpoint(best, tmp_path / "ema" / "best.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, best["model"][key])
    result = predict.main(["--checkpoint", str(tmp_path / "ema" / "best.pt"), "--output", str(tmp_path / "pred"),
                           "--device", "cpu"])  # the run's stored test split, scored
    assert result.written and not result.failures and 0 <= result.metrics["dice"] <= 1


@pytest.mark.parametrize("flags, message", [
    (["--minutes", "-1"], "--minutes"), (["--minutes", "nan"], "--minutes"), (["--ema", "1"], "--ema"),
])
def test_bad_budget_and_ema_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.main(flags)
    assert message in capsys.readouterr().err
