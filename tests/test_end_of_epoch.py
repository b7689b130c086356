"""The end of an epoch (validation and listening samples) runs only where it leaves the time kept back for
the last checkpoint and the final model: before the first, by the plan's estimate (or a guess); after,
by what the last one took on the budget's clock."""

import pytest

import clip_data
import loop
import planning
import train_vits
import training_flags

# 6 training clips in batches of 2, one step each: 3 steps (6 s on the budget clock) an epoch.
QUICK = ["--device", "cpu", "--batch_size", "2", "--grad_accum", "1", "--disc_channels", "64", "--num_workers", "1",
         "--eval_clips", "0", "--warmup_steps", "2", "--d_warmup_steps", "0", "--max_samples", "6"]
RESERVE = 2.5 * 5.0 + 2.0  # planning.Budget.reserve() while no save has taken longer than its 5 s guess


@pytest.mark.parametrize("budget, end_of_epoch_s, epochs, ran", [
    # After epoch 1 (6 s) 24 s are left: the 14.5 s kept back and the 10 s guessed do not fit in them.
    (30, 12, 2, []),
    # Each end of epoch takes 20 s: at 6 s and 32 s it fits (79 s and 53 s left); at 58 s, with 27 s left,
    # the 20 s it took last time do not fit beside the 14.5 s kept back (the 10 s guess would have).
    (85, 20, 3, [1, 2]),
])
def test_validation_and_samples_never_eat_the_time_kept_for_the_final_save(
        prepared_dataset, tiny_model_dir, tmp_path, two_second_steps, monkeypatch, budget, end_of_epoch_s, epochs,
        ran):
    clock, done = two_second_steps, []

    def timed_end_of_epoch(trainer, tokenizer, val_sets, sentences, epoch, *args, **kwargs):
        clock[0] += end_of_epoch_s
        done.append((epoch, budget - clock[0]))
    monkeypatch.setattr(loop, "end_of_epoch", timed_end_of_epoch)
    monkeypatch.setattr(planning.Budget, "reserve", lambda self: RESERVE)
    code = train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir",
                            str(tmp_path / "run"), "--epochs", str(epochs), "--target_hours", str(budget / 3600)]
                           + QUICK)
    assert code == 0
    assert [epoch for epoch, _ in done] == ran
    assert all(left >= RESERVE for _, left in done)
    assert clock[0] <= budget - RESERVE + 2  # the step running at the deadline, at most


def test_before_the_first_end_of_epoch_the_plan_says_what_it_will_take(tiny_clips, monkeypatch):
    monkeypatch.setattr(planning, "benchmark_throughput", lambda *a, **k: 2.0)  # 2 clips/s
    budget = planning.Budget(3600.0)
    assert budget.end_of_epoch_seconds == planning.EPOCH_OVERHEAD_S  # a guess, before any plan
    planning.plan_run(None, [tiny_clips], clip_data.epoch_batches(tiny_clips, 2, 0), 30,
                      training_flags.parse(["--grad_accum", "1", "--batch_size", "2"]), budget)
    # 30 held-out clips validated at 3x the training pace, then the samples and the save.
    assert budget.end_of_epoch_seconds == pytest.approx(30 / (3 * 2.0) + planning.EPOCH_OVERHEAD_S)
