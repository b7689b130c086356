"""loop.py: the loop's deadline and interrupts, the one line a run stopped before training prints, and the end
of an epoch (validation, samples) that never eats the time kept for the final save."""

import json
import os
from voicetune.night import planning
import pytest
import shutil
import signal

from voicetune.night import clip_data
from voicetune.night import loop
import train_vits
from voicetune.night import training_flags
from conftest import one_error_line, QUICK, quick


def test_budget_run_ends_in_time_and_skips_a_corrupt_wav(prepared_dataset, tiny_model_dir, tmp_path, capsys,
                                                         two_second_steps):
    data = str(tmp_path / "data")
    shutil.copytree(prepared_dataset, data)
    with open(os.path.join(data, "wavs", "corrupt.wav"), "wb") as f:
        f.write(b"RIFF\x00\x01\x00\x00WAVEfmt garbage")
    with open(os.path.join(data, "metadata.csv"), "a", encoding="utf-8") as f:
        f.write("corrupt.wav|ez bi kurdî diaxivim\n")
    # The budget's clock counts 2 s a training step, so the deadline falls at a known step on any machine;
    # the time kept back for saving (at least 2 s) covers the step that was already running.
    clock = two_second_steps
    out = str(tmp_path / "run")
    # 100 epochs cannot fit: the deadline, not the plan, must end this run, and before the budget is spent.
    code = train_vits.main(["--model", tiny_model_dir, "--data_dir", data, "--output_dir", out, "--epochs", "100",
                    "--target_hours", str(40 / 3600)] + QUICK)
    assert code == 0
    assert clock[0] <= 40, clock[0]
    assert os.path.isfile(os.path.join(out, "final_model", "model.safetensors"))
    printed = capsys.readouterr().out
    assert "skipped clip corrupt.wav" in printed
    assert "(deadline, step" in printed
    with open(os.path.join(out, "run_config.json")) as f:
        assert any("corrupt.wav" in e for e in json.load(f)["skipped_clips"])


def test_ctrl_c_asks_to_stop_where_there_is_no_sigterm(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.delattr(signal, "SIGTERM")
    with loop.StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
    assert signal.getsignal(signal.SIGINT) == before


def test_ctrl_c_before_training_is_one_line(prepared_dataset, tiny_model_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(clip_data, "decode_all", interrupted)
    assert train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir",
                    str(tmp_path / "run")] + QUICK) == 130
    assert "interrupted" in one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------- the end of an epoch and the final save

# 6 training clips in batches of 2, one step each: 3 steps (6 s on the budget clock) an epoch.
END_OF_EPOCH_QUICK = quick(grad_accum=1, benchmark_samples=None, eval_clips=0, d_warmup_steps=0, max_samples=6)
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
                           + END_OF_EPOCH_QUICK)
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
