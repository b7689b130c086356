"""checkpoints.py: which checkpoint is the newest past epoch 9, pruning beside stray or damaged files, the
flags a resumed run must keep (--seed), and a fall-back to fp32 that outlives a resume."""

import argparse
import os
import re

import pytest
import torch

import checkpoints
import models
import run_errors
import train_vits
import vits_trainer


def progress_checkpoint(folder, name, step, epoch, batches_done=0):
    """A checkpoint file holding only what ordering needs: the progress it records."""
    path = os.path.join(folder, "checkpoints", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoints.atomic_torch_save(dict(trainer=dict(step=step), epoch=epoch, batches_done=batches_done), path)
    return path


def epochs_of(folder):
    """The epoch numbers of the checkpoint files in `folder`, as numbers (the plain reference)."""
    names = os.listdir(os.path.join(folder, "checkpoints"))
    return sorted(int(re.fullmatch(r"checkpoint_epoch_(\d+)(_partial)?\.pt", n).group(1)) for n in names
                  if n.startswith("checkpoint_epoch_"))


def test_a_night_past_epoch_9_keeps_and_resumes_from_its_newest_checkpoints(tmp_path):
    out = str(tmp_path / "run")
    # Written newest first, so neither the names (10 sorts before 9) nor the dates give the order.
    for epoch in (12, 11, 10, 9, 8):
        progress_checkpoint(out, f"checkpoint_epoch_{epoch}.pt", 10 * epoch, epoch)
        os.utime(os.path.join(out, "checkpoints", f"checkpoint_epoch_{epoch}.pt"), (2e9 - epoch, 2e9 - epoch))
    args = argparse.Namespace(resume="auto", output_dir=out)
    path, state = checkpoints.resume_state(args)
    assert path == os.path.join(out, "checkpoints", "checkpoint_epoch_12.pt") and state["epoch"] == 12
    checkpoints.prune_checkpoints(out, 3)
    assert epochs_of(out) == [10, 11, 12]
    # Epoch 13 cut short: its partial checkpoint is the newest, and epoch 10 the one pruned.
    progress_checkpoint(out, "checkpoint_epoch_13_partial.pt", 125, 13, 5)
    checkpoints.prune_checkpoints(out, 3)
    assert epochs_of(out) == [11, 12, 13]
    assert checkpoints.resume_state(args)[0] == os.path.join(out, "checkpoints", "checkpoint_epoch_13_partial.pt")


def test_stray_or_damaged_checkpoint_files_never_stop_the_pruning(tmp_path):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "checkpoints")
    for epoch in (1, 2, 3):
        progress_checkpoint(out, f"checkpoint_epoch_{epoch}.pt", 10 * epoch, epoch)
    strays = {"checkpoint_epoch_0.pt": b"",  # cut to nothing
              "checkpoint_epoch_7.pt": b"PK\x03\x04 not a zip at all" * 3}  # damaged
    for name, data in strays.items():
        with open(os.path.join(ckpt, name), "wb") as f:
            f.write(data)
    # Tensors and plain values, but not a checkpoint of ours: a state dict saved by hand, a list.
    torch.save({"weight": torch.zeros(2)}, os.path.join(ckpt, "checkpoint_epoch_5.pt"))
    torch.save([1, 2, 3], os.path.join(ckpt, "checkpoint_epoch_6.pt"))
    checkpoints.prune_checkpoints(out, 2)
    assert sorted(os.listdir(ckpt)) == ["checkpoint_epoch_0.pt", "checkpoint_epoch_2.pt", "checkpoint_epoch_3.pt",
                                        "checkpoint_epoch_5.pt", "checkpoint_epoch_6.pt", "checkpoint_epoch_7.pt"]
    # --resume auto cannot tell which is newest past a file it cannot read: one line naming it.
    for name in ("checkpoint_epoch_5.pt", "checkpoint_epoch_6.pt", "checkpoint_epoch_7.pt"):
        with pytest.raises(run_errors.TrainingError) as err:
            checkpoints.checkpoint_progress(os.path.join(ckpt, name))
        assert os.path.join(ckpt, name) in str(err.value) and "\n" not in str(err.value)


def test_a_resume_with_another_seed_is_refused():
    saved = vars(train_vits.parse_args(["--seed", "7"]))
    checkpoints.check_resumed_flags(saved, train_vits.parse_args(["--seed", "7", "--epochs", "9"]), "c.pt")
    with pytest.raises(run_errors.TrainingError, match=re.escape("--seed 8 (the run has 7)")):
        checkpoints.check_resumed_flags(saved, train_vits.parse_args(["--seed", "8"]), "c.pt")


def fp16_trainer(model_dir):
    model, _ = models.load_voice(model_dir)
    models.prepare_for_training(model)
    args = train_vits.parse_args(["--device", "cpu", "--grad_accum", "1"])  # --precision auto
    trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"),
                                       "fp16")
    trainer.schedule(10)
    return trainer


def test_a_fall_back_to_fp32_at_the_very_first_step_outlives_a_resume(tiny_model_dir, tmp_path):
    trainer = fp16_trainer(tiny_model_dir)
    trainer.fall_back_to_fp32("20 non-finite fp16 steps in a row at step 0")
    path = str(tmp_path / "checkpoint_epoch_1_partial.pt")
    for _ in range(2):  # resumed, and resumed again from the resumed run's checkpoint
        checkpoints.atomic_torch_save(dict(trainer=trainer.state_dict()), path)
        trainer = fp16_trainer(tiny_model_dir)
        trainer.load_state_dict(checkpoints.read_checkpoint(path)["trainer"])
        assert trainer.precision == "fp32" and not trainer.scaler.is_enabled()
        assert trainer.autocast().__class__ is not torch.autocast
        assert trainer.fp32_from_step == 0
