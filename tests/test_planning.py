"""planning.py: the night's plan fits its budget: the benchmark's small share, no benchmark where none is
needed, a plan of steps (less than an epoch, a solo phase longer than the run), a budget too small for one
step, a --max_steps run re-planned from its first real steps, and batch size auto."""

import contextlib
import dataclasses
import math
import os

import pytest
import torch

from voicetune.common import distributed
from voicetune.common import run_errors
from voicetune.night import clip_data
from voicetune.night import loop
from voicetune.night import planning
import train_vits
from voicetune.night import training_flags
from conftest import quick, tiny_trainer


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


class Left:
    def __init__(self, seconds):
        self.seconds = seconds

    def left(self):
        return self.seconds

    def reserve(self):
        return 0.0


def test_a_max_steps_run_the_budget_cuts_inside_the_warm_up_keeps_half_for_the_voice(tiny_model_dir):
    trainer = tiny_trainer(tiny_model_dir, "--max_steps", "100")
    for left, total, warmup in ((40.0, 18, 9),  # 26 s after the reserve: 13 more steps of 2 s, 9 of 18 solo
                                (20.0, 8, 5)):  # 3 more: the 5 solo steps already taken stay taken
        trainer.step = 0
        trainer.schedule(100, 50)
        plan = planning.Plan(epochs=17, total_steps=100, steps_per_epoch=6)
        run = loop.Run(plan, d_warmup_steps=50)
        budget = Left(left)
        budget.reserve = lambda: 14.0
        pace = planning.StepPace(trainer, plan, trainer.args, budget, run)
        for _ in range(5):
            trainer.step += 1
            pace.stepped(2.0)
        assert (plan.total_steps, run.d_warmup_steps) == (total, warmup)


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
    assert plan.d_only_samples_per_s is None and plan.total_steps > 0


def test_a_run_given_epochs_or_max_steps_is_not_benchmarked(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir)
    monkeypatch.setattr(planning, "benchmark_throughput", lambda *a, **k: pytest.fail("no benchmark needed"))
    make_batches = clip_data.epoch_batches(tiny_clips, 2, 0)  # 6 batches: 6 steps an epoch
    plan = planning.plan_run(trainer, [tiny_clips], make_batches, 1, training_flags.parse(["--max_steps", "6", "--grad_accum", "1"]),
                             Left(3600.0), d_warmup=200)
    assert (plan.epochs, plan.total_steps, plan.samples_per_s) == (1, 6, None)
    plan = planning.plan_run(trainer, [tiny_clips], make_batches, 1, training_flags.parse(["--epochs", "3", "--grad_accum", "1"]),
                             Left(3600.0))
    assert (plan.epochs, plan.total_steps) == (3, 18)


def test_a_budget_too_small_for_one_step_is_one_line(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir)
    monkeypatch.setattr(planning, "benchmark_throughput", lambda *a, **k: 1.0)  # a 2-clip step takes 2 s
    with pytest.raises(run_errors.TrainingError) as err:
        planning.plan_run(trainer, [tiny_clips], clip_data.epoch_batches(tiny_clips, 2, 0), 1,
                          training_flags.parse(["--target_hours", str(1.5 / 3600), "--grad_accum", "1"]), Left(1.5))
    message = str(err.value)
    assert "\n" not in message and "hold no training step" in message and "2.0 s each" in message


def test_a_max_steps_run_the_budget_cannot_hold_is_replanned_from_its_first_steps(tiny_model_dir):
    trainer = tiny_trainer(tiny_model_dir, "--lr", "1e-3", "--max_steps", "100")
    trainer.schedule(100)
    plan = planning.Plan(epochs=17, total_steps=100, steps_per_epoch=6)
    budget = Left(50.0)
    budget.reserve = lambda: 14.0
    pace = planning.StepPace(trainer, plan, trainer.args, budget, loop.Run(plan))
    for _ in range(5):
        trainer.opt_g.step()
        trainer.sched_g.step()
        trainer.step += 1
        pace.stepped(2.0)  # 2 s a step, the first one included
    lr_now = trainer.sched_g.get_last_lr()[0]
    # 36 s left after the reserve hold 18 more steps of 2 s: the plan ends at step 5 + 18.
    assert plan.total_steps == 23 and plan.epochs == 4
    lrs = []
    for _ in range(18):
        trainer.opt_g.step()
        trainer.sched_g.step()
        lrs.append(trainer.sched_g.get_last_lr()[0])
    assert all(b <= a for a, b in zip([lr_now] + lrs, lrs))  # from where it was, never up
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    # A budget that holds the rest keeps the plan.
    plan2 = planning.Plan(epochs=17, total_steps=100, steps_per_epoch=6)
    pace = planning.StepPace(trainer, plan2, trainer.args, Left(10_000.0), loop.Run(plan2))
    pace.budget.reserve = lambda: 14.0
    for _ in range(5):
        pace.stepped(2.0)
    assert plan2.total_steps == 100


def test_a_resumed_max_steps_run_is_paced_by_its_steps_after_the_first_against_the_steps_left(tiny_model_dir, capsys):
    """The first step after a (re)start pays for the start-up (loading, the first kernels): it is no pace. And a
    resumed run has only its steps left to fit, not all of them."""
    trainer = tiny_trainer(tiny_model_dir, "--max_steps", "100")
    state = dict(plan=dataclasses.asdict(planning.Plan(epochs=17, total_steps=100, steps_per_epoch=6)),
                 args=dict(max_steps=100), d_warmup_steps=0)
    for left, total, epochs in ((60.0, 100, 17),  # 46 s after the reserve hold the 35 steps left at 1 s
                                (34.0, 85, 15)):  # 20 s hold 20 of them: the plan ends at step 65 + 20
        trainer.step = 60
        trainer.schedule(100)
        plan = planning.resumed_plan(trainer, state, trainer.args)
        assert (plan.total_steps, plan.samples_per_s) == (100, None)
        budget = Left(left)
        budget.reserve = lambda: 14.0
        pace = planning.StepPace(trainer, plan, trainer.args, budget, loop.Run(plan))
        for seconds in (30.0, 1.0, 1.0, 1.0, 1.0):
            trainer.step += 1
            pace.stepped(seconds)
        assert (plan.total_steps, plan.epochs) == (total, epochs), left
        assert "plan: 1.00 s a step" in capsys.readouterr().out


def test_a_one_minute_budget_ends_inside_it_with_a_final_model(prepared_dataset, tiny_model_dir, tmp_path,
                                                               two_second_steps, capsys):
    # A clock of 2 s a training step (benchmark steps included) stands for a slow, busy machine.
    clock = two_second_steps
    out = str(tmp_path / "run")
    code = train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out,
                            "--target_hours", str(60 / 3600), "--benchmark_samples", "200"]
                           + quick(grad_accum=1, eval_clips=0, benchmark_samples=None, d_warmup_steps=None))
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
    assert plan.total_steps == 5 and plan.epochs == 1


def test_benchmark_times_the_samples_asked_cycling_batches_and_restores_the_weights(tiny_model_dir, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    seen = []

    def fake_window(window, d_only=False):
        seen.append((tuple(id(b) for b in window), d_only))
        torch.nn.init.zeros_(trainer.model.decoder.conv_pre.bias)  # as if trained
        trainer.step += 1
    monkeypatch.setattr(trainer, "train_window", fake_window)
    batches = [dict(frames=torch.ones(n)) for n in (2, 3, 1)]
    planning.benchmark_throughput(trainer, batches, 1, 20, d_only=True)
    # one warm-up window, then windows 1, 2, 0, 1, ... (3 + 1 + 2 samples a cycle) until 20 samples: ten
    assert [w for w, _ in seen] == [(id(batches[0]),)] + [(id(batches[i % 3]),) for i in range(1, 11)]
    assert all(d_only for _, d_only in seen)
    assert trainer.step == 0
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())


def test_plan_counts_the_faster_discriminator_only_warmup(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = tiny_trainer(tiny_model_dir)
    calls = []

    def fake_benchmark(trainer, batches, grad_accum, samples, d_only=False, max_seconds=math.inf):
        calls.append((samples, d_only, max_seconds))
        return 4.0 if d_only else 1.0
    monkeypatch.setattr(planning, "benchmark_throughput", fake_benchmark)
    args = train_vits.parse_args(["--batch_size", "2", "--grad_accum", "2", "--benchmark_samples", "40"])
    make_batches = clip_data.epoch_batches(tiny_clips, 2, 0)
    n = len(tiny_clips)
    assert n == 12  # 6 batches of 2: 3 steps of 4 clips an epoch
    plan = planning.plan_run(trainer, [tiny_clips], make_batches, 3, args, Left(3600.0), d_warmup=200)
    # Both kinds of step timed, each within half of 2% of the budget.
    assert calls == [(40, False, 36.0), (10, True, 36.0)]
    # Steps of 4 clips: 1 s while the critic trains alone (4/s), 4 s after (1/s); 11 s after each epoch
    # for validation (3 clips at 3x the speed) and saving. 200 critic steps = 66 epochs of 14 s + 2 steps.
    d_epochs = 66
    left = 3600 - d_epochs * 14 - (1 + 1 + 4 + 11)  # epoch 67: two critic steps, one whole step
    whole, left = divmod(left, 12 + 11)
    assert plan.total_steps == (d_epochs + 1 + whole) * 3 + int(left // 4)
    assert plan.epochs == math.ceil(plan.total_steps / 3) and plan.steps_per_epoch == 3
    calls.clear()
    plan = planning.plan_run(trainer, [tiny_clips], make_batches, 3, args, Left(3600.0))
    assert calls == [(40, False, 72.0)]
    assert plan.total_steps == 3600 // 23 * 3 + int(3600 % 23 // 4)


def test_batch_size_auto_takes_the_largest_batch_that_fits_and_keeps_the_effective_batch(tiny_clips, capsys):
    def step_of(capacity, limit):
        def step(b):  # a fake device: 100 bytes a clip, out of memory beyond `limit`
            if 100 * b > limit:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return 100 * b, capacity
        return step
    assert planning.largest_batch(32, step_of(1000, 1000)) == 8  # 16 runs out of memory
    assert planning.largest_batch(32, step_of(850, 1000)) == 4  # 8 fits, but with less than 10% to spare
    assert planning.largest_batch(12, step_of(1000, 1000)) == 6  # divisors only: 6 x 2 keeps 12 a step
    assert planning.largest_batch(32, step_of(1000, 50)) is None
    # On a CPU a fixed micro-batch, and 8 x --grad_accum clips a step as with the default --batch_size.
    cpu = type("CpuTrainer", (), dict(device=torch.device("cpu")))()
    args = train_vits.parse_args(["--batch_size", "auto", "--grad_accum", "4"])
    assert planning.choose_batch_size(cpu, tiny_clips, args) == (8, 4)
    assert "batch size auto: 8 clips x 4 accumulated = 32 per optimizer step" in capsys.readouterr().out
    for bad in ("0", "big"):
        with pytest.raises(SystemExit):
            train_vits.parse_args(["--batch_size", bad])


def test_batch_size_auto_is_the_default_and_leaves_other_programs_their_gpu_memory(tiny_clips, monkeypatch, capsys):
    assert train_vits.parse_args([]).batch_size == "auto"
    gib = 2 ** 30
    # A card of 8 GiB: 3 GiB free, 1 GiB held by this process's allocator, the rest a desktop's.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (3 * gib, 8 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 1 * gib)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)
    assert planning.gpu_memory_bytes(torch.device("cuda")) == 4 * gib
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 0.25)  # with_gpu_memory.py 2
    assert planning.gpu_memory_bytes(torch.device("cuda:0")) == 2 * gib
    # Under torchrun no process searches alone (a trial running out of memory would strand the others).
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    gpu = type("GpuTrainer", (), dict(device=torch.device("cuda:0")))()
    assert planning.choose_batch_size(gpu, tiny_clips, train_vits.parse_args(["--grad_accum", "4"])) == (8, 4)
    assert "under torchrun auto does not search" in capsys.readouterr().out


def test_batch_auto_lowers_grad_accum_to_keep_the_effective_batch(tiny_clips, monkeypatch):
    capacity = 10_000  # bytes the fake GPU lets this process use

    class FakeGpuTrainer:
        device = torch.device("cuda:0")

        def __init__(self, fits_up_to):
            self.fits_up_to, self.peak, self.tried = fits_up_to, 0, []

        def trial_steps(self):
            return contextlib.nullcontext()  # its steps change nothing

        def train_window(self, batches, d_only=False):
            b = len(batches[0]["frames"])
            self.tried.append(b)
            if b > self.fits_up_to:
                raise torch.OutOfMemoryError("CUDA out of memory")
            self.peak = 100 * b  # well inside the 10% headroom
            return {}

    monkeypatch.setattr(planning, "gpu_memory_bytes", lambda device: capacity)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    args = train_vits.parse_args(["--batch_size", "auto", "--grad_accum", "4"])
    effective = 8 * 4
    for limit in (5, 3, 16, 100):
        trainer = FakeGpuTrainer(limit)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None, t=trainer: t.peak)
        batch, accum = planning.choose_batch_size(trainer, tiny_clips, args)
        plain = max(d for d in range(1, effective + 1) if effective % d == 0 and d <= limit)
        assert (batch, accum) == (plain, effective // plain), limit
        assert batch * accum == effective and effective % batch == 0
        assert trainer.tried and max(t for t in trainer.tried if t <= limit) == plain
    assert args.grad_accum == 4  # the parsed flags stay as given
