"""A short budget never ends "done" with the voice untouched: a fresh critic's solo warm-up (200 steps in
train_vits.py, 50 in train_feedback.py) is shortened to at most half of the steps the plan holds, said in
one line and recorded in run_config.json, so the generator gets real steps."""

import json
import os

import torch
from safetensors.torch import load_file

from voicetune.common import speech
from voicetune.night import planning
import train_feedback
import train_vits
from voicetune.night import vits_trainer
from conftest import quick

# A fresh critic with the trainers' own solo warm-up (200 and 50 steps); one micro-batch of 2 a step.
FRESH_CRITIC = quick(grad_accum=1, benchmark_samples=None, eval_clips=0, d_warmup_steps=None, discriminator="none")
EMBEDDING = "text_encoder.embed_tokens.weight"  # untouched by every critic-only step, exactly


def test_the_solo_warm_up_is_at_most_half_of_the_planned_steps():
    # The night that ended untouched: 131 steps fit, all inside 200 solo steps; now 65 solo, 66 for the voice.
    assert planning.critic_warmup(200, lambda warmup: 131) == 65
    assert planning.critic_warmup(50, lambda warmup: 1) == 0
    # A warm-up that already fits its share is kept, and so is no warm-up.
    assert planning.critic_warmup(200, lambda warmup: 400) == 200
    assert planning.critic_warmup(0, lambda warmup: 3) == 0
    # Solo steps are faster: fewer of them fit fewer steps, so the share is taken of what then fits.
    # 100 s, a solo step 1 s, a full one 4 s: w solo steps fit w + (100 - w) // 4 steps in all.
    fits = lambda warmup: warmup + (100 - warmup) // 4  # noqa: E731
    warmup = planning.critic_warmup(200, fits)
    assert warmup == 20 and fits(20) == 40  # 20 is half of 40; 21 solo steps would fit only 40 too
    assert all(w > fits(w) // 2 for w in range(21, 201))


def trained_steps(monkeypatch):
    """[(step, d_only)] of every training step of fit(), recorded as it runs."""
    steps, real_window = [], vits_trainer.VitsTrainer.train_window

    def recorded(trainer, batches, d_only=False):
        steps.append((trainer.step, d_only))
        return real_window(trainer, batches, d_only=d_only)
    monkeypatch.setattr(vits_trainer.VitsTrainer, "train_window", recorded)
    return steps


def one_clip_a_second(monkeypatch):
    # A 2-clip step takes 2 s on the budget clock (two_second_steps), solo or not: the plan is known.
    monkeypatch.setattr(planning, "benchmark_throughput", lambda *a, **k: 1.0)


def check_the_voice_trained(out, steps, start_model, printed):
    with open(os.path.join(out, "run_config.json"), encoding="utf-8") as f:
        info = json.load(f)
    planned, warmup, asked = info["planned_steps"], info["d_warmup_steps"], info["d_warmup_steps_asked"]
    assert warmup == planned // 2 < asked
    line = (f"plan: the critic's solo warm-up is shortened from {asked} to {warmup} steps, 50% of the {planned} "
            f"planned at most, so the voice itself trains {planned - warmup} steps")
    assert line in printed.splitlines()
    # Every planned step ran: the first `warmup` trained the critic alone, the rest the voice too.
    assert steps == [(k, k < warmup) for k in range(planned)]
    assert planned - warmup > 0
    before = load_file(os.path.join(start_model, "model.safetensors"))[EMBEDDING]
    after = load_file(os.path.join(out, "final_model", "model.safetensors"))[EMBEDDING]
    assert not torch.equal(before, after)


def test_train_vits_short_budget_with_a_fresh_critic_trains_the_voice(prepared_dataset, tiny_model_dir, tmp_path,
                                                                      two_second_steps, monkeypatch, capsys):
    one_clip_a_second(monkeypatch)
    steps = trained_steps(monkeypatch)
    out = str(tmp_path / "run")
    code = train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out,
                            "--target_hours", str(45 / 3600)] + FRESH_CRITIC)
    assert code == 0
    # 45 s less 14.5 s kept for the final save: one epoch (11 clips, 11 s, and ~10 s after it), then what
    # fits of the next: 10 or 11 steps where 200 solo steps were asked for.
    check_the_voice_trained(out, steps, tiny_model_dir, capsys.readouterr().out)
    assert len(steps) in (10, 11)


def test_train_feedback_short_budget_with_a_fresh_critic_trains_the_voice(prepared_dataset, tiny_model_dir,
                                                                          tmp_path, two_second_steps, monkeypatch,
                                                                          capsys):
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    rows, _ = speech.parse_metadata(os.path.join(prepared_dataset, "metadata.csv"))
    for i, (name, text) in enumerate(rows[:5]):
        with open(os.path.join(prepared_dataset, "wavs", name), "rb") as src:
            (feedback / f"audio_{i:03d}.wav").write_bytes(src.read())
        (feedback / f"audio_{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    one_clip_a_second(monkeypatch)
    steps = trained_steps(monkeypatch)
    out = str(tmp_path / "tuned")
    code = train_feedback.main(["--model", tiny_model_dir, "--feedback_dir", str(feedback), "--feedback_only",
                                "--output_dir", out, "--target_hours", str(60 / 3600),
                                "--val_size", "1", "--feedback_weight", "1"] + FRESH_CRITIC)
    assert code == 0
    check_the_voice_trained(out, steps, tiny_model_dir, capsys.readouterr().out)


def test_a_max_steps_run_inside_the_warm_up_trains_the_voice_half_of_it(prepared_dataset, tiny_model_dir, tmp_path,
                                                                         monkeypatch, capsys):
    steps = trained_steps(monkeypatch)
    out = str(tmp_path / "run")
    code = train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out,
                            "--max_steps", "3", "--val_size", "0"] + FRESH_CRITIC)
    assert code == 0
    printed = capsys.readouterr().out
    assert "plan: the critic's solo warm-up is shortened from 200 to 1 steps" in printed
    assert steps == [(0, True), (1, False), (2, False)]

