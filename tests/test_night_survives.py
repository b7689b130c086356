"""What happens at 3 a.m. does not lose the night: fp16 that keeps failing goes on in fp32."""

import copy
import math

import pytest
import torch

import clip_data
import models
import objective
import run_errors
import training_flags
import vits_trainer


def fp16_trainer(tiny_model_dir, *flags):
    torch.manual_seed(0)
    model, _ = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    args = training_flags.parse(["--warmup_steps", "0", "--grad_accum", "1", "--max_bad_steps", "3", *flags])
    trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"),
                                       "fp16")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** -4)  # the tiny model's gradients fit here
    trainer.schedule(100)
    return trainer


def everything(trainer):
    """What a skipped step must leave as it was: weights, optimizer and schedule states."""
    return copy.deepcopy(dict(model=trainer.model.state_dict(), disc=trainer.disc.state_dict(),
                              opt_g=trainer.opt_g.state_dict(), opt_d=trainer.opt_d.state_dict(),
                              sched=(trainer.sched_g.last_epoch, trainer.sched_d.last_epoch), step=trainer.step))


def assert_same(a, b):
    for key in ("model", "disc"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("opt_g", "opt_d"):
        for p, state in a[key]["state"].items():
            assert all(torch.equal(v, b[key]["state"][p][n]) for n, v in state.items() if torch.is_tensor(v)), key
    assert a["sched"] == b["sched"] and a["step"] == b["step"]


def test_fp16_that_keeps_failing_goes_on_in_fp32_from_the_state_the_skipped_steps_left(tiny_model_dir, tiny_clips,
                                                                                       monkeypatch, capsys):
    trainer = fp16_trainer(tiny_model_dir)
    batch = clip_data.collate([(tiny_clips, 0), (tiny_clips, 1)], 32)
    assert trainer.train_window([batch]) is not None  # fp16 works, at first
    before = everything(trainer)
    # Then every fp16 step overflows (as the critic's loss of a diverging fp16 run does); fp32 does not.
    real = objective.discriminator_loss
    overflow = {"fp16"}
    monkeypatch.setattr(objective, "discriminator_loss",
                        lambda r, f: real(r, f) * (math.inf if trainer.precision in overflow else 1.0))
    for _ in range(3):
        assert trainer.train_window([batch]) is None
    assert "3 non-finite fp16 steps in a row at step 1: going on in fp32" in capsys.readouterr().out
    assert trainer.precision == "fp32" and not trainer.scaler.is_enabled() and trainer.fp32_from_step == 1
    assert trainer.bad_steps == 0 and trainer.skipped_steps == 3
    assert_same(before, everything(trainer))
    # The night goes on, in fp32, and the checkpoint says so.
    assert trainer.train_window([batch]) is not None and trainer.step == 2
    state = trainer.state_dict()
    assert state["fp32_from_step"] == 1

    # A resumed run stays in fp32 (auto would pick fp16 again on that card), unless fp16 is asked for.
    resumed = fp16_trainer(tiny_model_dir)
    resumed.load_state_dict(state)
    assert resumed.precision == "fp32" and not resumed.scaler.is_enabled() and resumed.fp32_from_step == 1
    asked = fp16_trainer(tiny_model_dir, "--precision", "fp16")
    asked.load_state_dict(state)
    assert asked.precision == "fp16" and asked.scaler.is_enabled()

    # fp32 that keeps failing still stops the run, with the message.
    overflow.add("fp32")
    with pytest.raises(run_errors.TrainingError, match="3 non-finite training steps in a row"):
        for _ in range(3):
            trainer.train_window([batch])


# ----------------------------------------------------------------------------------------------------
# Out of GPU memory

def window_trainer(tiny_model_dir):
    torch.manual_seed(0)
    model, _ = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    args = training_flags.parse(["--warmup_steps", "0", "--grad_accum", "1", "--lr", "1e-3"])
    trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"),
                                       "fp32")
    trainer.schedule(100)
    return trainer


def weights(trainer):
    return {k: v.clone() for k, v in list(trainer.model.state_dict().items()) + list(trainer.disc.state_dict().items())}


def four_windows(tiny_clips):
    return [[clip_data.collate([(tiny_clips, (4 * w + i) % len(tiny_clips)) for i in range(4)], 32)] for w in range(4)]


def test_out_of_memory_trains_the_same_clips_in_pieces_as_a_run_split_from_the_start(tiny_model_dir, tiny_clips,
                                                                                     monkeypatch, capsys):
    windows = four_windows(tiny_clips)
    real_forward = objective.generator_forward
    oom_from_step = [math.inf]

    def forward(model, batch, segment_frames):
        # The card holds 2 clips a micro-batch, from step 3 on (a longer batch, the desktop taking memory).
        if len(batch["frames"]) > 2 and trainer.step >= oom_from_step[0]:
            torch.rand(8)  # partway through the forward: its noise is drawn already
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(model, batch, segment_frames)
    monkeypatch.setattr(objective, "generator_forward", forward)

    torch.manual_seed(1)
    trainer = window_trainer(tiny_model_dir)
    oom_from_step[0] = 2
    survived = [trainer.train_window(w) for w in windows]
    assert "out of GPU memory at step 3 in the critic's pass: micro-batches of 4 clips now train in 2 pieces" \
        in capsys.readouterr().out
    assert trainer.step == 4 and trainer.splits == {4: 2} and trainer.oom_splits == 1
    survived_weights, state = weights(trainer), trainer.state_dict()

    # The same run with the split from step 3 on, and no out of memory: the same updates, exactly.
    oom_from_step[0] = math.inf
    torch.manual_seed(1)
    trainer = window_trainer(tiny_model_dir)
    reference = []
    for k, w in enumerate(windows):
        if k == 2:
            trainer.splits = {4: 2}
        reference.append(trainer.train_window(w))
    assert survived == reference
    assert all(torch.equal(survived_weights[k], v) for k, v in weights(trainer).items())
    # The split is part of the run: a resumed run keeps it.
    resumed = window_trainer(tiny_model_dir)
    resumed.load_state_dict(state)
    assert resumed.splits == {4: 2} and resumed.oom_splits == 1


def test_out_of_memory_after_the_critic_stepped_runs_only_the_generator_again(tiny_model_dir, tiny_clips,
                                                                               monkeypatch):
    batch = four_windows(tiny_clips)[0]
    torch.manual_seed(1)
    plain = window_trainer(tiny_model_dir)
    plain.train_window(batch)
    torch.manual_seed(1)
    trainer = window_trainer(tiny_model_dir)
    real_critic = trainer.generator_critic

    def generator_critic(out):
        if out["audio"].size(0) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_critic(out)
    monkeypatch.setattr(trainer, "generator_critic", generator_critic)
    terms = trainer.train_window(batch)
    assert terms is not None and trainer.step == 1 and trainer.splits == {4: 2}
    # The critic stepped once, as the run without the out of memory stepped it: the same weights.
    assert all(s["step"] == 1 for s in trainer.opt_d.state.values())
    assert all(torch.equal(v, plain.disc.state_dict()[k]) for k, v in trainer.disc.state_dict().items())
    assert all(s["step"] == 1 for s in trainer.opt_g.state.values()) and trainer.sched_g.last_epoch == 1


def test_out_of_memory_with_one_clip_a_piece_stops_with_one_line(tiny_model_dir, tiny_clips, monkeypatch):
    monkeypatch.setattr(objective, "generator_forward",
                        lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    trainer = window_trainer(tiny_model_dir)
    with pytest.raises(run_errors.TrainingError, match="out of GPU memory at step 1 in the critic's pass: not even "
                                                       "one clip fits"):
        trainer.train_window(four_windows(tiny_clips)[0])
    assert trainer.splits == {4: 4}
