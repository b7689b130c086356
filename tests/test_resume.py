"""Resume: a stopped, killed or finished run goes on exactly where it was (steps, batches, learning rate,
critic, batch size, a fall-back to fp32), from the newest checkpoint (past epoch 9 too), and refuses
checkpoints that hold code or belong to another run (other flags, --seed included, other data); pruning
leaves stray or damaged files alone."""

import argparse
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import huggingface_hub
import numpy as np
import pytest
import soundfile as sf
import torch

from voicetune.common import run_errors
from voicetune.common import run_folder
from voicetune.night import checkpoints
from voicetune.night import clip_data
from voicetune.night import planning
from voicetune.voice import models
import train_feedback as tf
import train_vits
from voicetune.night import training_flags
from voicetune.night import vits_trainer
from voicetune.voice import voice_quality
from conftest import effective_weights, fake_checkpoint, FEEDBACK_QUICK, one_error_line, QUICK, ROOT, tiny_trainer


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_main_writes_models_samples_metrics_and_resumes_exactly(prepared_dataset, tiny_model_dir, tmp_path):
    first = str(tmp_path / "first")
    common = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--epochs", "2", "--logging_steps", "1",
              "--val_size", "2"] + QUICK
    assert train_vits.main(common + ["--output_dir", first]) == 0
    for path in ("checkpoints/checkpoint_epoch_1.pt", "checkpoints/checkpoint_epoch_2.pt",
                 "checkpoints/best_model/model.safetensors", "final_model/model.safetensors",
                 "final_model/discriminator.pt", "samples/epoch_1/00.wav", "samples/epoch_2/00.wav",
                 "run_config.json"):
        assert os.path.isfile(os.path.join(first, path)), path
    metrics = read_metrics(first)
    assert {"step", "epoch", "mel", "kl", "dur", "adv", "fm", "d", "lr", "samples_per_s"} <= set(metrics[-2])
    # The final voice is the last trained one: the last listening sample is its speech (same noise).
    model, tokenizer = models.load_voice(os.path.join(first, "final_model"))
    voice_quality.synthesise(model, tokenizer, [voice_quality.DEFAULT_SENTENCES[0]], str(tmp_path / "final_samples"))
    sample, sr = sf.read(os.path.join(first, "samples/epoch_2/00.wav"), dtype="int16")
    final, _ = sf.read(str(tmp_path / "final_samples" / "00.wav"), dtype="int16")
    assert sr == 16000 and len(sample) == len(final) > 0
    assert np.abs(sample.astype(np.int32) - final).max() <= 1

    # Resume from the epoch-1 checkpoint in a fresh folder: same step, same LR, same losses.
    second = str(tmp_path / "second")
    os.makedirs(os.path.join(second, "checkpoints"))
    epoch1 = os.path.join(second, "checkpoints", "checkpoint_epoch_1.pt")
    shutil.copy(os.path.join(first, "checkpoints/checkpoint_epoch_1.pt"), epoch1)
    saved = torch.load(epoch1, weights_only=True)
    assert train_vits.main(common + ["--output_dir", second, "--resume", epoch1]) == 0
    resumed = read_metrics(second)
    original = [m for m in metrics if m["step"] > saved["trainer"]["step"]]
    assert resumed[0]["step"] == saved["trainer"]["step"] + 1
    assert len(resumed) == len(original) > 0
    for a, b in zip(original, resumed):
        assert a.keys() == b.keys()
        for key in set(a) - {"samples_per_s"}:
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


@pytest.mark.parametrize("stop", ["max_steps", "ctrl_c", "deadline"])
def test_a_run_stopped_mid_epoch_resumes_with_exactly_the_batches_it_had_left(stop, prepared_dataset, tiny_model_dir,
                                                                              tmp_path, monkeypatch):
    trained, expired = [], [False]
    real_collate, real_left = clip_data.collate, planning.Budget.left

    def named_collate(items, segment_frames):
        batch = real_collate(items, segment_frames)
        batch["names"] = [cs.names[i] for cs, i in items]
        return batch

    def recorded_step(self, batches, d_only=False):
        # The step itself is tested in test_vits_trainer.py: here only which clips each step gets matters.
        trained.append([name for batch in batches for name in batch["names"]])
        self.step += 1
        if self.step == 3 and stop == "ctrl_c":
            signal.raise_signal(signal.SIGINT)
        expired[0] = self.step == 3 and stop == "deadline"
        return dict(d=0.0)

    monkeypatch.setattr(clip_data, "collate", named_collate)
    monkeypatch.setattr(vits_trainer.VitsTrainer, "train_window", recorded_step)
    monkeypatch.setattr(planning.Budget, "left", lambda self: 0.0 if expired[0] else real_left(self))
    (tmp_path / "sentences.txt").write_text("roj\n", encoding="utf-8")
    out = str(tmp_path / "run")
    args = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "1",
            "--device", "cpu", "--batch_size", "2", "--grad_accum", "1", "--disc_channels", "64", "--num_workers", "1",
            "--benchmark_samples", "0", "--val_size", "0", "--sample_sentences", str(tmp_path / "sentences.txt")]
    code = train_vits.main(args + (["--max_steps", "3"] if stop == "max_steps" else []))
    assert code == (130 if stop == "ctrl_c" else 0)
    first = list(trained)
    assert len(first) == 3

    trained.clear()
    expired[0] = False
    assert train_vits.main(args + ["--resume", "auto"]) == 0
    with open(os.path.join(out, "run_config.json"), encoding="utf-8") as f:
        n_train = json.load(f)["train_clips"]
    names = [name for step in first + trained for name in step]
    assert len(first) + len(trained) == math.ceil(n_train / 2)  # exactly the steps that were left
    assert len(names) == len(set(names)) == n_train  # every clip once, none twice


def train_until_signal(args, step, signame):
    """train_vits.py in a subprocess that signals itself `signame` right after training step `step`."""
    env = dict(os.environ, TEST_SIGNAL_AFTER_STEP=str(step), TEST_SIGNAL=signame, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "hooked_run.py"), "train_vits"] + args,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# QUICK trains 11 clips as 3 optimizer steps an epoch: step 5 lies inside epoch 2.
def test_sigkill_mid_epoch_resumes_from_last_checkpoint(prepared_dataset, tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    # No voice-quality measures at the epochs' ends: what is checked is where the run stops and resumes.
    args = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "6",
            "--logging_steps", "1", "--eval_clips", "0"] + QUICK
    assert train_until_signal(args, 5, "SIGKILL").returncode == -signal.SIGKILL
    checkpoints = glob.glob(os.path.join(out, "checkpoints", "checkpoint_epoch_*.pt"))
    steps = [torch.load(path, weights_only=True)["trainer"]["step"] for path in checkpoints]  # none truncated
    assert steps == [3]
    capsys.readouterr()
    assert train_vits.main(args + ["--resume", "auto", "--epochs", "3"]) == 0
    assert "step 3," in capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "final_model", "model.safetensors"))
    assert not glob.glob(os.path.join(out, "checkpoints", "*.tmp*"))


def test_sigterm_saves_a_resumable_checkpoint_and_exits(prepared_dataset, tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    args = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "6",
            "--eval_clips", "0"] + QUICK
    assert train_until_signal(args, 5, "SIGTERM").returncode == 130
    interrupted = glob.glob(os.path.join(out, "checkpoints", "checkpoint_epoch_*_interrupted.pt"))
    assert len(interrupted) == 1
    state = torch.load(interrupted[0], weights_only=True)
    assert state["epoch"] == 2 and state["trainer"]["step"] == 5
    assert not os.path.exists(os.path.join(out, "final_model"))


def test_checkpoints_are_ordered_by_the_progress_they_record(tmp_path):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "checkpoints")
    # (file, step, epoch): the copy reset the dates so that the oldest file looks newest.
    for i, (name, step, epoch) in enumerate([("checkpoint_epoch_5.pt", 50, 5), ("checkpoint_epoch_4.pt", 40, 4),
                                             ("checkpoint_epoch_6_partial.pt", 53, 6),
                                             ("checkpoint_epoch_3.pt", 30, 3)]):
        fake_checkpoint(os.path.join(ckpt, name), step, epoch)
        os.utime(os.path.join(ckpt, name), (1e9 + i, 1e9 + i))
    assert checkpoints.newest_checkpoint(out) == os.path.join(ckpt, "checkpoint_epoch_6_partial.pt")
    checkpoints.prune_checkpoints(out, 2)
    assert sorted(os.listdir(ckpt)) == ["checkpoint_epoch_5.pt", "checkpoint_epoch_6_partial.pt"]


def test_feedback_resume_auto_takes_the_latest_run_by_its_start_time(tmp_path):
    parent = str(tmp_path / "feedback_models")
    for i, run in enumerate(["20261125-090000-2", "20261125-090000", "20261124-230000", "20261125-090000-10"]):
        fake_checkpoint(os.path.join(parent, run, "checkpoints", "checkpoint_epoch_1.pt"), 1, 1)
        os.utime(os.path.join(parent, run, "checkpoints", "checkpoint_epoch_1.pt"), (2e9 - i, 2e9 - i))
    os.makedirs(os.path.join(parent, "20261126-000000"))  # no checkpoint: nothing to resume
    assert run_folder.newest_run_dir(parent) == os.path.join(parent, "20261125-090000-10")


def test_resume_continues_and_keeps_the_before_figures(trained_voice, feedback_dir, prepared_dataset, tmp_path):
    out = str(tmp_path / "run")
    common = ["--model", trained_voice, "--data_dir", prepared_dataset, "--feedback_dir", feedback_dir,
              "--output_dir", out] + FEEDBACK_QUICK
    assert tf.main(common + ["--max_steps", "1"]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        first = json.load(f)
    sample = os.path.join(out, "samples", "before", "eval", "00.wav")
    written = os.stat(sample).st_mtime_ns
    assert tf.main(common + ["--max_steps", "2", "--resume", "auto"]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        second = json.load(f)
    assert first["steps"] == 1 and second["steps"] == 2
    # "before" is the input voice's, measured once: not the resumed checkpoint's.
    assert second["before"] == first["before"]
    assert os.stat(sample).st_mtime_ns == written


def advance(trainer, steps, d_only=False):
    """Optimizer steps without gradients, as train_window steps the schedules; the weights do not move."""
    for _ in range(steps):
        for opt, sched in ((trainer.opt_g, trainer.sched_g), (trainer.opt_d, trainer.sched_d))[d_only:]:
            opt.step()
            sched.step()
        trainer.step += 1


def cosine(s, n):
    return 0.5 * (1 + np.cos(np.pi * s / n))


def test_resume_with_more_epochs_decays_the_lr_from_where_it_is_never_up(tiny_model_dir):
    trainer = tiny_trainer(tiny_model_dir, "--lr", "1e-3")
    trainer.args.warmup_steps = 2
    # 12 steps, the first 2 discriminator-only: the generator's own schedule has 10 steps.
    trainer.schedule(12, d_warmup_steps=2)
    advance(trainer, 2, d_only=True)
    advance(trainer, 6)
    lr_g, lr_d = trainer.lr(), trainer.sched_d.get_last_lr()[0]
    assert lr_g == pytest.approx(1e-3 * cosine(4, 8)) and lr_d == pytest.approx(1e-3 * cosine(6, 10))
    # As load_checkpoint does, then --epochs 6 where the plan had 2 (6 steps an epoch).
    state = trainer.state_dict()
    trainer.schedule(12, 2)
    trainer.load_state_dict(state)
    plan = planning.Plan(epochs=2, total_steps=12, steps_per_epoch=6)
    planning.resize_plan(trainer, plan, 6, None, 2)
    assert plan.total_steps == 36
    assert plan.decay_from == [[6, pytest.approx(lr_g / 1e-3)], [8, pytest.approx(lr_d / 1e-3)]]
    lrs_g, lrs_d = [], []
    for _ in range(28):
        advance(trainer, 1)
        lrs_g.append(trainer.lr())
        lrs_d.append(trainer.sched_d.get_last_lr()[0])
    # Both reach 0 at the new last step (the generator's 34th, the critic's 36th), from where they were.
    assert lrs_g == pytest.approx([lr_g * cosine(s, 28) for s in range(1, 29)], abs=1e-12)
    assert lrs_d == pytest.approx([lr_d * cosine(s, 28) for s in range(1, 29)], abs=1e-12)
    assert all(b < a for a, b in zip([lr_g] + lrs_g, lrs_g[:-1])) and lrs_g[-1] == 0.0 and lrs_d[-1] == 0.0
    # A checkpoint of the re-planned run resumes on the same curve.
    state = trainer.state_dict()
    trainer.schedule(plan.total_steps, 2, plan.decay_from)
    trainer.load_state_dict(state)
    advance(trainer, 1)
    assert trainer.lr() == 0.0 and trainer.sched_d.get_last_lr()[0] == 0.0


def test_batch_size_auto_on_resume_keeps_the_batch_the_run_chose(tmp_path, tiny_clips, capsys):
    checkpoint = str(tmp_path / "checkpoint_epoch_1.pt")
    saved = vars(train_vits.parse_args(["--batch_size", "16", "--grad_accum", "2"]))
    torch.save(dict(args=saved), checkpoint)
    cpu = type("CpuTrainer", (), dict(device=torch.device("cpu")))()
    args = train_vits.parse_args(["--batch_size", "auto", "--grad_accum", "4", "--resume", checkpoint])
    args = planning.with_batch(args, *planning.choose_batch_size(cpu, tiny_clips, args,
                                                                 checkpoints.resume_state(args)[1]))
    assert (args.batch_size, args.grad_accum) == (16, 2)  # not a new choice (8 x 4 on a CPU)
    assert "16 clips x 2 accumulated, as the resumed run had" in capsys.readouterr().out
    checkpoints.check_resumed_flags(saved, args, checkpoint)  # the resume is not refused


def test_a_resumed_run_takes_its_critic_from_the_checkpoint_and_asks_no_hub(monkeypatch, capsys):
    torch.manual_seed(5)
    disc = models.VitsDiscriminator(max_channels=64)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("no Hub call on resume"))
    args = training_flags.parse(["--model", "facebook/mms-tts-kmr-script_latin"])
    got, path = models.critic_for_run(args, ("run/checkpoints/checkpoint_epoch_2.pt",
                                             dict(trainer=dict(disc=disc.state_dict()))))
    assert path == "run/checkpoints/checkpoint_epoch_2.pt"
    assert "critic: the checkpoint's, run/checkpoints/checkpoint_epoch_2.pt" in capsys.readouterr().out
    for name, weight in effective_weights(disc).items():
        torch.testing.assert_close(effective_weights(got)[name], weight, rtol=0, atol=0)


class Payload:
    """Pickles to a call of os.mkdir: loading it with full pickle would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("how", ["auto", "path"])
def test_a_checkpoint_holding_code_is_refused_and_never_run(prepared_dataset, tiny_model_dir, tmp_path, capsys,
                                                           how):
    out = str(tmp_path / "run")
    marker = str(tmp_path / "code_ran")
    planted = os.path.join(out, "checkpoints", "checkpoint_epoch_9.pt")
    os.makedirs(os.path.dirname(planted))
    torch.save(dict(trainer=dict(step=1), epoch=9, batches_done=0, payload=Payload(marker)), planted)
    code = train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "1",
                    "--resume", "auto" if how == "auto" else planted] + QUICK)
    assert code == 2
    error = one_error_line(capsys.readouterr().err)
    assert "refused" in error and planted in error
    assert not os.path.exists(marker)


def test_resume_refuses_flags_that_change_the_run():
    saved = vars(train_vits.parse_args(["--lr", "2e-5", "--batch_size", "8"]))
    checkpoints.check_resumed_flags(saved, train_vits.parse_args(["--lr", "2e-5", "--batch_size", "8", "--epochs", "9"]),
                           "c.pt")  # free to change
    for flags, named in ((["--lr", "1e-4"], "--lr 0.0001 (the run has 2e-05)"),
                         (["--batch_size", "4"], "--batch_size 4 (the run has 8)"),
                         (["--grad_accum", "2"], "--grad_accum 2 (the run has 4)")):
        with pytest.raises(run_errors.TrainingError, match=re.escape(named)):
            checkpoints.check_resumed_flags(saved, train_vits.parse_args(flags), "c.pt")


def test_d_lr_is_checked_and_kept_on_resume():
    with pytest.raises(SystemExit):
        training_flags.parse(["--d_lr", "0"])
    saved = vars(training_flags.parse(["--d_lr", "1e-4"]))
    with pytest.raises(Exception, match=r"--d_lr 0.0002 \(the run has 0.0001\)"):
        checkpoints.check_resumed_flags(saved, training_flags.parse(["--d_lr", "2e-4"]), "c.pt")


def test_resume_refuses_a_checkpoint_of_other_data(prepared_dataset, tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    args = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--epochs", "1", "--output_dir", out,
            "--eval_clips", "0"] + QUICK
    assert train_vits.main(args) == 0
    assert train_vits.main(args + ["--resume", "auto", "--max_samples", "8"]) == 2


def test_the_data_check_sees_a_wav_replaced_under_its_name(tiny_model_dir):
    _, tokenizer = models.load_voice(tiny_model_dir)
    pcm = np.arange(16000, dtype=np.int16)
    mel = np.zeros((80, 62), np.float16)
    before = clip_data.ClipSet([("a.wav", "roj baş", pcm, mel)], tokenizer)
    replaced = clip_data.ClipSet([("a.wav", "roj baş", pcm[::-1].copy(), mel)], tokenizer)
    retexted = clip_data.ClipSet([("a.wav", "roj xweş", pcm, mel)], tokenizer)
    keys = {checkpoints.data_fingerprint([cs], {}) for cs in (before, replaced, retexted)}
    assert len(keys) == 3
    assert checkpoints.data_fingerprint([before], {}) == checkpoints.data_fingerprint([before.subset([0])], {})


# ---------------------------------------------------------- past epoch 9, stray files, --seed, fp32

def epochs_of(folder):
    """The epoch numbers of the checkpoint files in `folder`, as numbers (the plain reference)."""
    names = os.listdir(os.path.join(folder, "checkpoints"))
    return sorted(int(re.fullmatch(r"checkpoint_epoch_(\d+)(_partial)?\.pt", n).group(1)) for n in names
                  if n.startswith("checkpoint_epoch_"))


def test_a_night_past_epoch_9_keeps_and_resumes_from_its_newest_checkpoints(tmp_path):
    out = str(tmp_path / "run")
    # Written newest first, so neither the names (10 sorts before 9) nor the dates give the order.
    for epoch in (12, 11, 10, 9, 8):
        fake_checkpoint(os.path.join(out, "checkpoints", f"checkpoint_epoch_{epoch}.pt"), 10 * epoch, epoch)
        os.utime(os.path.join(out, "checkpoints", f"checkpoint_epoch_{epoch}.pt"), (2e9 - epoch, 2e9 - epoch))
    args = argparse.Namespace(resume="auto", output_dir=out)
    path, state = checkpoints.resume_state(args)
    assert path == os.path.join(out, "checkpoints", "checkpoint_epoch_12.pt") and state["epoch"] == 12
    checkpoints.prune_checkpoints(out, 3)
    assert epochs_of(out) == [10, 11, 12]
    # Epoch 13 cut short: its partial checkpoint is the newest, and epoch 10 the one pruned.
    fake_checkpoint(os.path.join(out, "checkpoints", "checkpoint_epoch_13_partial.pt"), 125, 13, 5)
    checkpoints.prune_checkpoints(out, 3)
    assert epochs_of(out) == [11, 12, 13]
    assert checkpoints.resume_state(args)[0] == os.path.join(out, "checkpoints", "checkpoint_epoch_13_partial.pt")


def test_stray_or_damaged_checkpoint_files_never_stop_the_pruning(tmp_path):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "checkpoints")
    for epoch in (1, 2, 3):
        fake_checkpoint(os.path.join(out, "checkpoints", f"checkpoint_epoch_{epoch}.pt"), 10 * epoch, epoch)
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


def test_a_fall_back_to_fp32_at_the_very_first_step_outlives_a_resume(tiny_model_dir, tmp_path):
    trainer = tiny_trainer(tiny_model_dir, precision="fp16", steps=10)  # --precision auto
    trainer.fall_back_to_fp32("20 non-finite fp16 steps in a row at step 0")
    path = str(tmp_path / "checkpoint_epoch_1_partial.pt")
    for _ in range(2):  # resumed, and resumed again from the resumed run's checkpoint
        models.atomic_torch_save(dict(trainer=trainer.state_dict()), path)
        trainer = tiny_trainer(tiny_model_dir, precision="fp16", steps=10)
        trainer.load_state_dict(checkpoints.read_checkpoint(path)["trainer"])
        assert trainer.precision == "fp32" and not trainer.scaler.is_enabled()
        assert trainer.autocast().__class__ is not torch.autocast
        assert trainer.fp32_from_step == 0
