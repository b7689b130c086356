"""The night's plan fits its budget: the benchmark's small share, no benchmark where none is needed, a plan
of steps (less than an epoch, a solo phase longer than the run), a budget too small for one step, and a
--max_steps run re-planned from its first real steps."""

import math
import os

import pytest
import torch

import clip_data
import loop
import models
import planning
import run_errors
import train_vits
import training_flags
import vits_trainer

QUICK = ["--device", "cpu", "--batch_size", "2", "--grad_accum", "1", "--disc_channels", "64", "--num_workers", "1",
         "--eval_clips", "0", "--warmup_steps", "2"]


def tiny_trainer(model_dir, *flags):
    model, _ = models.load_voice(model_dir)
    models.prepare_for_training(model)
    args = training_flags.parse(["--grad_accum", "1", "--batch_size", "2", *flags])
    return vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"),
                                    "fp32")


class Left:
    def __init__(self, seconds):
        self.seconds = seconds

    def left(self):
        return self.seconds

    def reserve(self):
        return 0.0


def test_steps_that_fit_count_whole_epochs_then_part_of_one_and_only_the_solo_steps_that_happen():
    # 3 steps of 4 clips an epoch; 4 s a step (1 clip/s), 1 s while the critic trains alone (4 clips/s);
    # 10 s after each whole epoch.
    fit = planning.steps_that_fit
    # 100 s, 5 solo steps: 13 + 16 + 22 + 22 + 22 = 95 s for 5 epochs, then one more step of 4 s.
    assert fit(100, [4, 4, 4], 1.0, 4.0, 5, 10.0) == 16
    # A solo phase longer than the run: every step is a fast critic-only one, less than an epoch fits.
    assert fit(2.5, [4, 4, 4], 1.0, 4.0, 1000, 10.0) == 2
    # The same budget without a solo phase: no step of 4 s fits.
    assert fit(2.5, [4, 4, 4], 1.0, 4.0, 0, 10.0) == 0
    # The last, smaller step of an epoch costs what its clips cost: 4 + 4 + 2 s fit 10.5 s.
    assert fit(10.5, [4, 4, 2], 1.0, 1.0, 0, 10.0) == 3


def test_the_benchmark_stops_at_its_share_of_the_budget(tiny_model_dir, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir)
    clock, windows = [0.0], []

    def one_second_window(window, d_only=False):
        windows.append(window)
        clock[0] += 1.0
    monkeypatch.setattr(trainer, "train_window", one_second_window)
    monkeypatch.setattr(planning.time, "time", lambda: clock[0])
    batches = [dict(frames=torch.ones(4)) for _ in range(3)]
    rate = planning.benchmark_throughput(trainer, batches, 1, 10_000, max_seconds=3.0)
    # The warm-up (1 s) and two timed steps (2 s) use the 3 s; the 10,000 samples asked for are not waited for.
    assert len(windows) == 3
    assert rate == pytest.approx(8 / 2.0)
    # A share shorter than the warm-up step: that one step is the measure, no second step is waited for.
    windows.clear()
    rate = planning.benchmark_throughput(trainer, batches, 1, 10_000, max_seconds=0.5)
    assert len(windows) == 1
    assert rate == pytest.approx(4 / 1.0)


def test_when_the_full_steps_took_the_share_the_solo_steps_are_not_timed(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir)
    clock, kinds = [0.0], []

    def slow_benchmark(trainer, batches, grad_accum, samples, d_only=False, max_seconds=math.inf):
        kinds.append(d_only)
        clock[0] += 80.0  # past both shares (2 x 2% of an hour): a full-width critic on a busy CPU
        return 1.0
    monkeypatch.setattr(planning, "benchmark_throughput", slow_benchmark)
    monkeypatch.setattr(planning.time, "time", lambda: clock[0])
    plan = planning.plan_run(trainer, [tiny_clips], clip_data.epoch_batches(tiny_clips, 2, 0), 1,
                             training_flags.parse(["--target_hours", "1", "--grad_accum", "1"]), Left(3600.0),
                             d_warmup=200)
    assert kinds == [False]
    assert plan["d_only_samples_per_s"] is None and plan["total_steps"] > 0


def test_a_run_given_epochs_or_max_steps_is_not_benchmarked(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir)
    monkeypatch.setattr(planning, "benchmark_throughput", lambda *a, **k: pytest.fail("no benchmark needed"))
    make_batches = clip_data.epoch_batches(tiny_clips, 2, 0)  # 6 batches: 6 steps an epoch
    plan = planning.plan_run(trainer, [tiny_clips], make_batches, 1, training_flags.parse(["--max_steps", "6", "--grad_accum", "1"]),
                             Left(3600.0), d_warmup=200)
    assert (plan["epochs"], plan["total_steps"], plan["samples_per_s"]) == (1, 6, None)
    plan = planning.plan_run(trainer, [tiny_clips], make_batches, 1, training_flags.parse(["--epochs", "3", "--grad_accum", "1"]),
                             Left(3600.0))
    assert (plan["epochs"], plan["total_steps"]) == (3, 18)


def test_a_budget_too_small_for_one_step_is_one_line(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir)
    monkeypatch.setattr(planning, "benchmark_throughput", lambda *a, **k: 1.0)  # a 2-clip step takes 2 s
    with pytest.raises(run_errors.TrainingError) as err:
        planning.plan_run(trainer, [tiny_clips], clip_data.epoch_batches(tiny_clips, 2, 0), 1,
                          training_flags.parse(["--target_hours", str(1.5 / 3600), "--grad_accum", "1"]), Left(1.5))
    message = str(err.value)
    assert "\n" not in message and "hold no training step" in message and "2.0 s each" in message


def test_a_max_steps_run_the_budget_cannot_hold_is_replanned_from_its_first_steps(tiny_model_dir):
    trainer = tiny_trainer(tiny_model_dir, "--lr", "1e-3", "--warmup_steps", "0", "--max_steps", "100")
    trainer.schedule(100)
    plan = dict(epochs=17, total_steps=100, steps_per_epoch=6, samples_per_s=None)
    budget = Left(50.0)
    budget.reserve = lambda: 14.0
    pace = loop.StepPace(trainer, plan, trainer.args, budget, dict(d_warmup_steps=0))
    for _ in range(5):
        trainer.opt_g.step()
        trainer.sched_g.step()
        trainer.step += 1
        pace.stepped(2.0)  # 2 s a step, the first one included
    lr_now = trainer.sched_g.get_last_lr()[0]
    # 36 s left after the reserve hold 18 more steps of 2 s: the plan ends at step 5 + 18.
    assert plan["total_steps"] == 23 and plan["epochs"] == 4
    lrs = []
    for _ in range(18):
        trainer.opt_g.step()
        trainer.sched_g.step()
        lrs.append(trainer.sched_g.get_last_lr()[0])
    assert all(b <= a for a, b in zip([lr_now] + lrs, lrs))  # from where it was, never up
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    # A budget that holds the rest keeps the plan.
    plan2 = dict(epochs=17, total_steps=100, steps_per_epoch=6, samples_per_s=None)
    pace = loop.StepPace(trainer, plan2, trainer.args, Left(10_000.0), dict(d_warmup_steps=0))
    pace.budget.reserve = lambda: 14.0
    for _ in range(5):
        pace.stepped(2.0)
    assert plan2["total_steps"] == 100


def test_a_one_minute_budget_ends_inside_it_with_a_final_model(prepared_dataset, tiny_model_dir, tmp_path,
                                                               two_second_steps, capsys):
    # A clock of 2 s a training step (benchmark steps included) stands for a slow, busy machine.
    clock = two_second_steps
    out = str(tmp_path / "run")
    code = train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out,
                            "--target_hours", str(60 / 3600), "--benchmark_samples", "200"] + QUICK)
    assert code == 0
    assert clock[0] <= 60, clock[0]
    assert os.path.isfile(os.path.join(out, "final_model", "model.safetensors"))
    printed = capsys.readouterr().out
    plan_line = next(line for line in printed.splitlines() if line.startswith("plan: "))
    assert math.isfinite(float(plan_line.split()[1]))


def test_the_plan_trains_only_in_what_is_not_kept_for_the_final_model(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir)
    monkeypatch.setattr(planning, "benchmark_throughput", lambda *a, **k: 1.0)  # a 2-clip step takes 2 s
    budget = Left(100.0)
    budget.reserve = lambda: 90.0  # the last checkpoint and the final model
    plan = planning.plan_run(trainer, [tiny_clips], clip_data.epoch_batches(tiny_clips, 2, 0), 1,
                             training_flags.parse(["--target_hours", "1", "--grad_accum", "1"]), budget)
    # 10 s to train in: no whole epoch (12 s of steps + its validation), five of its 2 s steps.
    assert plan["total_steps"] == 5 and plan["epochs"] == 1
