"""loop.py: the loop's deadline and interrupts, and the one line a run stopped before training prints."""

import json
import os
import shutil
import signal

import clip_data
import loop
import train_vits
from conftest import one_error_line, QUICK


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
