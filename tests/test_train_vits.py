"""train_vits.py: the VITS objective, spectrograms, MAS, saving, and the time-budgeted loop with resume."""

import copy
import glob
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import VitsModel, pipeline

import checkpoints
import clip_data
import distributed
import loop
import models
import objective
import planning
import run_errors
import spectrogram
import speech
import train_vits
import vits_trainer
import voice_quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags that keep a CPU run of the tiny model quick; every other flag keeps its real default.
QUICK = ["--device", "cpu", "--batch_size", "2", "--grad_accum", "2", "--disc_channels", "64",
         "--benchmark_samples", "4", "--num_workers", "1", "--warmup_steps", "2", "--d_warmup_steps", "1"]


def tiny_trainer(model_dir, lr=2e-4):
    model, tokenizer = models.load_voice(model_dir)
    models.prepare_for_training(model)
    args = train_vits.parse_args(["--lr", str(lr), "--warmup_steps", "0", "--grad_accum", "1"])
    trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"), "fp32")
    trainer.schedule(1000)
    return trainer, tokenizer


def batch_of(clipset, n):
    return clip_data.collate([(clipset, i) for i in range(n)], 32)


def test_one_step_gives_every_trainable_parameter_a_gradient(tiny_model_dir, tiny_clips):
    trainer, _ = tiny_trainer(tiny_model_dir)
    out, _ = trainer.critic_backward(batch_of(tiny_clips, 2), accum=1, keep_graph=True)
    trainer.generator_backward(out, accum=1)
    missing = [name for name, p in trainer.model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    missing += [name for name, p in trainer.disc.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []
    for part in ("text_encoder", "posterior_encoder", "flow", "decoder", "duration_predictor"):
        assert any(n.startswith(part) for n, _ in trainer.model.named_parameters())


def original_vits_step(model, disc, batches, lr, clip=100.0):
    """jaywalnut310/vits train.py's step, written out, with our clipping and AdamW: the critic's loss
    backward and its optimizer step first, then the generator's losses through the updated critic (run on
    real and generated slices) and its step. Several batches: gradients averaged, graphs all kept."""
    opt_d = torch.optim.AdamW(disc.parameters(), lr, betas=(0.8, 0.99), eps=1e-9)
    opt_g = torch.optim.AdamW(model.parameters(), lr, betas=(0.8, 0.99), eps=1e-9)
    outs = [objective.generator_forward(model, batch, 32) for batch in batches]
    for out in outs:
        real, _ = disc(out["audio"])
        fake, _ = disc(out["audio_hat"].detach())
        loss_d = sum(torch.mean((1 - r) ** 2) + torch.mean(f ** 2) for r, f in zip(real, fake))
        (loss_d / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(disc.parameters(), clip)
    opt_d.step()
    critic_grads = [p.grad.clone() for p in disc.parameters()]
    for out in outs:
        _, real_features = disc(out["audio"])
        fake, fake_features = disc(out["audio_hat"])
        adv = sum(torch.mean((1 - f) ** 2) for f in fake)
        fm = 2 * sum(torch.mean(torch.abs(r - f)) for rs, fs in zip(real_features, fake_features) for r, f in zip(rs, fs))
        mel = torch.mean(torch.abs(spectrogram.mel_spectrogram(out["audio_hat"][:, 0], 16000) - out["mel"]))
        loss_g = adv + fm + 45 * mel + out["loss_kl"] + out["loss_dur"]
        (loss_g / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt_g.step()
    return critic_grads, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_step_is_the_original_vits_order_critic_first(tiny_model_dir, tiny_clips, micro_batches):
    # A high LR, so that the critic's update visibly changes the generator's adversarial gradients.
    trainer, _ = tiny_trainer(tiny_model_dir, lr=5e-2)
    plain_model, plain_disc = copy.deepcopy(trainer.model), copy.deepcopy(trainer.disc)
    batches = [clip_data.collate([(tiny_clips, 2 * k), (tiny_clips, 2 * k + 1)], 32) for k in range(micro_batches)]
    torch.manual_seed(0)
    assert trainer.train_window(batches) is not None
    torch.manual_seed(0)
    critic_grads, generator_grads = original_vits_step(plain_model, plain_disc, batches, lr=5e-2)

    def close(ours, plain):
        torch.testing.assert_close(ours, plain, rtol=1e-3, atol=1e-4 * float(plain.abs().max()))
    for p, grad in zip(trainer.disc.parameters(), critic_grads):
        close(p.grad, grad)
    # The generator's gradients went through the critic as the plain step updated it: the same critic step,
    # taken before the generator's pass.
    for p, grad in zip(trainer.model.parameters(), generator_grads):
        if grad is not None:
            close(p.grad, grad)


def test_critic_is_unfrozen_when_the_generator_pass_fails(tiny_model_dir, tiny_clips, monkeypatch):
    trainer, _ = tiny_trainer(tiny_model_dir)
    forward, calls = trainer.disc.forward, []

    def failing_third_call(audio):
        calls.append((audio.shape[0], torch.is_grad_enabled()))
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return forward(audio)
    monkeypatch.setattr(trainer.disc, "forward", failing_third_call)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train_window([batch_of(tiny_clips, 2)])
    # The critic's pass on real + generated rows, then the generator's: the 2 real rows without a graph,
    # the 2 generated ones with one.
    assert calls == [(4, True), (2, False), (2, True)]
    assert all(p.requires_grad for p in trainer.disc.parameters())


def test_compile_flag_compiles_the_critic_and_decoder_in_place(tiny_model_dir, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model, _ = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    for flags, expected in (([], []), (["--compile"], ["disc", "decoder"])):
        compiled.clear()
        trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), train_vits.parse_args(flags),
                                 torch.device("cpu"), "fp32")
        parts = dict(disc=trainer.disc, decoder=trainer.model.decoder)
        assert [next(k for k, v in parts.items() if v is m) for m in compiled] == expected


def test_adamw_is_fused_where_supported_and_falls_back(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert vits_trainer.make_adamw(params, 1e-3).defaults["fused"] is True  # torch's CPU kernel
    adamw = torch.optim.AdamW

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("fused=True requires all the params to be floating point Tensors of supported devices")
        return adamw(*args, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = vits_trainer.make_adamw(params, 1e-3)
    assert not opt.defaults["fused"] and opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["eps"] == 1e-9


def test_fp16_runs_on_cpu_and_an_overflow_is_skipped_counted_and_leaves_the_weights(tiny_model_dir, tiny_clips):
    model, _ = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    args = train_vits.parse_args(["--warmup_steps", "0", "--grad_accum", "1", "--precision", "fp16", "--device", "cpu"])
    precision, _ = vits_trainer.resolve_precision(args.precision, torch.device("cpu"))
    trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"), precision)
    trainer.schedule(100)
    assert trainer.scaler.is_enabled()
    # The random tiny model's text-encoder gradients overflow fp16 at scales of 8 and more, at 1 on some
    # slices (measured): start low instead of spending a dozen skipped steps on the scaler's search.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** -4)
    torch.manual_seed(0)
    batch = batch_of(tiny_clips, 2)
    for d_only in (True, False):
        terms = trainer.train_window([batch], d_only=d_only)
        assert terms is not None and all(np.isfinite(v) for v in terms.values()), terms
    assert trainer.step == 2 and trainer.skipped_steps == 0

    # A loss scale no fp16 gradient survives: the scaler skips the update and halves its scale.
    trainer.scaler.update(2.0 ** 100)
    weights = {k: v.clone() for k, v in itertools.chain(trainer.model.state_dict().items(),
                                                        trainer.disc.state_dict().items())}
    assert trainer.train_window([batch]) is None
    assert trainer.scaler.get_scale() == 2.0 ** 99  # halved: the scaler saw the overflow
    assert trainer.step == 2 and trainer.skipped_steps == 1
    after = dict(itertools.chain(trainer.model.state_dict().items(), trainer.disc.state_dict().items()))
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    # That was the scaler's search for its scale, not divergence: it does not count towards --max_bad_steps.
    assert trainer.bad_steps == 0

    # Below a scale of 1 an overflow is no longer the search: it counts. Only the generator's gradients
    # overflow here, so the critic, which steps first, keeps its update.
    trainer.scaler.update(2.0 ** -2)
    hook = trainer.model.text_encoder.embed_tokens.weight.register_hook(lambda g: g * float("inf"))
    critic = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    assert trainer.train_window([batch]) is None
    hook.remove()
    assert trainer.scaler.get_scale() == 2.0 ** -3
    assert trainer.step == 2 and trainer.skipped_steps == 2 and trainer.bad_steps == 1
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert not all(torch.equal(critic[k], v) for k, v in trainer.disc.state_dict().items())


def test_benchmark_times_the_samples_asked_cycling_batches_and_restores_the_weights(tiny_model_dir, monkeypatch):
    trainer, _ = tiny_trainer(tiny_model_dir)
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


class FixedBudget:
    def left(self):
        return 3600.0

    def reserve(self):
        return 0.0


def test_plan_counts_the_faster_discriminator_only_warmup(tiny_model_dir, tiny_clips, monkeypatch):
    trainer, _ = tiny_trainer(tiny_model_dir)
    calls = []

    def fake_benchmark(trainer, batches, grad_accum, samples, d_only=False, max_seconds=math.inf):
        calls.append((samples, d_only, max_seconds))
        return 4.0 if d_only else 1.0
    monkeypatch.setattr(planning, "benchmark_throughput", fake_benchmark)
    args = train_vits.parse_args(["--batch_size", "2", "--grad_accum", "2", "--benchmark_samples", "40"])
    make_batches = clip_data.epoch_batches(tiny_clips, 2, 0)
    n = len(tiny_clips)
    assert n == 12  # 6 batches of 2: 3 steps of 4 clips an epoch
    plan = planning.plan_run(trainer, [tiny_clips], make_batches, 3, args, FixedBudget(), d_warmup=200)
    # Both kinds of step timed, each within half of 2% of the budget.
    assert calls == [(40, False, 36.0), (10, True, 36.0)]
    # Steps of 4 clips: 1 s while the critic trains alone (4/s), 4 s after (1/s); 11 s after each epoch
    # for validation (3 clips at 3x the speed) and saving. 200 critic steps = 66 epochs of 14 s + 2 steps.
    d_epochs = 66
    left = 3600 - d_epochs * 14 - (1 + 1 + 4 + 11)  # epoch 67: two critic steps, one whole step
    whole, left = divmod(left, 12 + 11)
    assert plan["total_steps"] == (d_epochs + 1 + whole) * 3 + int(left // 4)
    assert plan["epochs"] == math.ceil(plan["total_steps"] / 3) and plan["steps_per_epoch"] == 3
    calls.clear()
    plan = planning.plan_run(trainer, [tiny_clips], make_batches, 3, args, FixedBudget())
    assert calls == [(40, False, 72.0)]
    assert plan["total_steps"] == 3600 // 23 * 3 + int(3600 % 23 // 4)


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
    trainer, _ = tiny_trainer(tiny_model_dir, lr=1e-3)
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
    plan = dict(epochs=2, total_steps=12, steps_per_epoch=6)
    planning.resize_plan(trainer, plan, 6, None, 2)
    assert plan["total_steps"] == 36
    assert plan["decay_from"] == [[6, pytest.approx(lr_g / 1e-3)], [8, pytest.approx(lr_d / 1e-3)]]
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
    trainer.schedule(plan["total_steps"], 2, plan["decay_from"])
    trainer.load_state_dict(state)
    advance(trainer, 1)
    assert trainer.lr() == 0.0 and trainer.sched_d.get_last_lr()[0] == 0.0


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


def test_spectrograms_match_numpy_librosa_vits_formula():
    rng = np.random.default_rng(0)
    audio = (0.3 * np.sin(np.arange(7000) * 0.05) + 0.05 * rng.standard_normal(7000)).astype(np.float32)
    padded = np.pad(audio, (384, 384), mode="reflect")
    window = librosa.filters.get_window("hann", 1024, fftbins=True)
    n_frames = (len(padded) - 1024) // 256 + 1
    frames = np.stack([padded[i * 256:i * 256 + 1024] * window for i in range(n_frames)], axis=1)
    stft = np.fft.rfft(frames, axis=0)
    magnitude = np.sqrt(stft.real ** 2 + stft.imag ** 2 + 1e-6)
    basis = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=80, fmin=0, fmax=8000, htk=False, norm="slaney")
    expected_mel = np.log(np.clip(basis @ magnitude, 1e-5, None))

    spec = spectrogram.linear_spectrogram(torch.from_numpy(audio)[None])[0].numpy()
    mel = spectrogram.mel_spectrogram(torch.from_numpy(audio)[None], 16000)[0].numpy()
    assert spec.shape == (513, len(audio) // 256) == magnitude.shape
    np.testing.assert_allclose(spec, magnitude, atol=1e-4)
    np.testing.assert_allclose(mel, expected_mel, atol=1e-4)


def test_clips_with_more_tokens_than_frames_are_dropped_and_counted(tiny_model_dir):
    _, tokenizer = models.load_voice(tiny_model_dir)
    pcm = np.zeros(16000, dtype=np.int16)
    mel = np.zeros((80, 62), dtype=np.float16)
    clips = clip_data.ClipSet([("ok", "roj baş", pcm, mel), ("long", "ez bi kurdî diaxivim " * 4, pcm, mel)], tokenizer)
    assert clips.names == ["ok"]
    assert clips.dropped == {"more tokens than frames": 1}


def test_overfitting_four_clips_halves_the_mel_loss(tiny_model_dir, tiny_clips):
    torch.manual_seed(0)
    trainer, _ = tiny_trainer(tiny_model_dir, lr=2e-3)
    four = tiny_clips.subset(range(4))
    before = trainer.evaluate(four, 4)["mel"]
    batch = batch_of(four, 4)
    for _ in range(60):
        assert trainer.train_window([batch]) is not None
    after = trainer.evaluate(four, 4)["mel"]
    assert after <= 0.5 * before, (before, after)


def test_saved_model_loads_and_synthesises_with_pipeline(tiny_model_dir, tmp_path):
    trainer, tokenizer = tiny_trainer(tiny_model_dir)
    out = str(tmp_path / "voice")
    models.export_voice(trainer.model, tokenizer, trainer.disc, out)
    # The exported voice is the trained one: same speech for the same noise (decoder weight norm folded).
    ids = torch.tensor([speech.token_ids(tokenizer, "Roj baş, tu çawa yî?")])
    waveforms = []
    for model in (trainer.model, VitsModel.from_pretrained(out)):
        torch.manual_seed(0)
        with torch.no_grad():
            waveforms.append(model.eval()(input_ids=ids).waveform)
    torch.testing.assert_close(waveforms[1], waveforms[0], rtol=0, atol=1e-5)
    spoken = pipeline("text-to-speech", model=out, device="cpu")("Roj baş, tu çawa yî?")
    assert spoken["sampling_rate"] == 16000
    assert spoken["audio"].size > 0 and np.all(np.isfinite(spoken["audio"]))
    # The trainer keeps its decoder weight norm after saving, and the critic reloads.
    assert torch.nn.utils.parametrize.is_parametrized(trainer.model.decoder.upsampler[0])
    assert models.load_discriminator(os.path.join(out, "discriminator.pt")).max_channels == 64


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


def test_resume_refuses_a_checkpoint_of_other_data(prepared_dataset, tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    args = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--epochs", "1", "--output_dir", out] + QUICK
    assert train_vits.main(args) == 0
    assert train_vits.main(args + ["--resume", "auto", "--max_samples", "8"]) == 2


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


def train_until_signal(args, step, signame):
    """train_vits.py in a subprocess that signals itself `signame` right after training step `step`."""
    env = dict(os.environ, TEST_SIGNAL_AFTER_STEP=str(step), TEST_SIGNAL=signame, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "hooked_run.py"), "train_vits"] + args,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# QUICK trains 11 clips as 3 optimizer steps an epoch: step 5 lies inside epoch 2.
def test_sigkill_mid_epoch_resumes_from_last_checkpoint(prepared_dataset, tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "6",
            "--logging_steps", "1"] + QUICK
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
    args = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "6"] + QUICK
    assert train_until_signal(args, 5, "SIGTERM").returncode == 130
    interrupted = glob.glob(os.path.join(out, "checkpoints", "checkpoint_epoch_*_interrupted.pt"))
    assert len(interrupted) == 1
    state = torch.load(interrupted[0], weights_only=True)
    assert state["epoch"] == 2 and state["trainer"]["step"] == 5
    assert not os.path.exists(os.path.join(out, "final_model"))


def test_preload_decodes_in_spawned_workers_as_on_windows(tiny_clips, prepared_dataset, tmp_path,
                                                          spawn_start_method):
    clips, errors = clip_data.load_clips(prepared_dataset, 16000, str(tmp_path / "cache"), 1)  # one worker process
    assert errors == [] and [c[0] for c in clips] == tiny_clips.names
    assert all(np.array_equal(c[2], a) and np.array_equal(c[3], m) for c, a, m in
               zip(clips, tiny_clips.audio, tiny_clips.mels))


def test_ctrl_c_asks_to_stop_where_there_is_no_sigterm(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.delattr(signal, "SIGTERM")
    with loop.StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
    assert signal.getsignal(signal.SIGINT) == before


def test_preload_cache_is_reused_and_rebuilt_when_a_clip_changes(prepared_dataset, tmp_path, capsys, monkeypatch):
    data = str(tmp_path / "data")
    shutil.copytree(prepared_dataset, data)
    cache = str(tmp_path / "cache")
    first, _ = clip_data.load_clips(data, 16000, cache, 1)
    capsys.readouterr()
    cached, _ = clip_data.load_clips(data, 16000, cache, 1)
    assert "from cache" in capsys.readouterr().out
    for a, b in zip(first, cached):
        assert a[0] == b[0] and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])

    name = first[0][0]
    sf.write(os.path.join(data, "wavs", name), np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    rebuilt, _ = clip_data.load_clips(data, 16000, cache, 1)
    assert "from cache" not in capsys.readouterr().out
    assert not np.any(dict((c[0], c[2]) for c in rebuilt)[name])
    assert len(glob.glob(os.path.join(cache, "preload_*.npz"))) == 1

    # What psutil reports on every system (the check must not need Linux's /proc/meminfo).
    monkeypatch.setattr(clip_data.psutil, "virtual_memory", lambda: SimpleNamespace(available=1000, total=2000))
    shutil.rmtree(cache)
    with pytest.raises(run_errors.TrainingError, match="GiB"):
        clip_data.load_clips(data, 16000, cache, 1)
