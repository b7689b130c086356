"""Issue 10: a night's work is never lost and no file runs code: safe checkpoints, the output-folder
lock, refused overlaps and hostile input, and one clear line for every failure."""

import os

import pytest
import torch

import train_feedback as tf
import train_vits as tv

# Flags that keep a CPU run of the tiny model quick (as in test_train_vits.py).
QUICK = ["--device", "cpu", "--batch_size", "2", "--grad_accum", "2", "--disc_channels", "64",
         "--benchmark_samples", "4", "--num_workers", "1", "--warmup_steps", "2", "--d_warmup_steps", "1"]


class Payload:
    """Pickles to a call of os.mkdir: loading it with full pickle would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def one_error_line(stderr):
    """The one `error:` line a script printed (progress bars aside), with no traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


def fake_checkpoint(path, step, epoch, batches_done=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(trainer=dict(step=step), epoch=epoch, batches_done=batches_done), path)


# ---------------------------------------------------------------------------------------------------- 1, 4

@pytest.mark.parametrize("how", ["auto", "path"])
def test_a_checkpoint_holding_code_is_refused_and_never_run(prepared_dataset, tiny_model_dir, tmp_path, capsys,
                                                           how):
    out = str(tmp_path / "run")
    marker = str(tmp_path / "code_ran")
    planted = os.path.join(out, "checkpoints", "checkpoint_epoch_9.pt")
    os.makedirs(os.path.dirname(planted))
    torch.save(dict(trainer=dict(step=1), epoch=9, batches_done=0, payload=Payload(marker)), planted)
    code = tv.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "1",
                    "--resume", "auto" if how == "auto" else planted] + QUICK)
    assert code == 2
    error = one_error_line(capsys.readouterr().err)
    assert "refused" in error and planted in error
    assert not os.path.exists(marker)


def test_checkpoints_are_ordered_by_the_progress_they_record(tmp_path):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "checkpoints")
    # (file, step, epoch): the copy reset the dates so that the oldest file looks newest.
    for i, (name, step, epoch) in enumerate([("checkpoint_epoch_5.pt", 50, 5), ("checkpoint_epoch_4.pt", 40, 4),
                                             ("checkpoint_epoch_6_partial.pt", 53, 6),
                                             ("checkpoint_epoch_3.pt", 30, 3)]):
        fake_checkpoint(os.path.join(ckpt, name), step, epoch)
        os.utime(os.path.join(ckpt, name), (1e9 + i, 1e9 + i))
    assert tv.newest_checkpoint(out) == os.path.join(ckpt, "checkpoint_epoch_6_partial.pt")
    tv.prune_checkpoints(out, 2)
    assert sorted(os.listdir(ckpt)) == ["checkpoint_epoch_5.pt", "checkpoint_epoch_6_partial.pt"]


def test_feedback_resume_auto_takes_the_latest_run_by_its_start_time(tmp_path):
    parent = str(tmp_path / "feedback_models")
    for i, run in enumerate(["20261125-090000-2", "20261125-090000", "20261124-230000", "20261125-090000-10"]):
        fake_checkpoint(os.path.join(parent, run, "checkpoints", "checkpoint_epoch_1.pt"), 1, 1)
        os.utime(os.path.join(parent, run, "checkpoints", "checkpoint_epoch_1.pt"), (2e9 - i, 2e9 - i))
    os.makedirs(os.path.join(parent, "20261126-000000"))  # no checkpoint: nothing to resume
    assert tf.newest_run_dir(parent) == os.path.join(parent, "20261125-090000-10")
