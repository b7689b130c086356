"""training_flags.py: every bad flag is one line."""

import pytest

import train_feedback as tf
import train_vits
from conftest import one_error_line, QUICK


@pytest.mark.parametrize("flags", [["--lr", "0"], ["--lr", "nan"], ["--seed", "-1"], ["--device", "foo"],
                                   ["--target_hours", "nan"], ["--target_hours", "inf"], ["--val_size", "-1"],
                                   ["--grad_clip", "-1"], ["--epochs", "-1"], ["--max_steps", "-3"],
                                   ["--sample_sentences", "no_such_file.txt"]])
def test_bad_flags_are_one_line(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_vits.parse_args(flags)
    assert exit_info.value.code == 2
    assert flags[0] in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags", [["--feedback_weight", "nan"], ["--feedback_weight", "inf"],
                                   ["--target_minutes", "nan"]])
def test_bad_feedback_flags_are_one_line(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tf.parse_args(flags + ["--output_dir", "unused"])
    assert exit_info.value.code == 2
    assert flags[0] in one_error_line(capsys.readouterr().err)


def test_segment_frames_longer_than_every_clip_is_refused(prepared_dataset, tiny_model_dir, tmp_path, capsys):
    assert train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", str(tmp_path / "run"),
                    "--epochs", "1"] + QUICK + ["--segment_frames", "100000"]) == 2
    assert "--segment_frames 100000 is longer than the longest" in one_error_line(capsys.readouterr().err)
