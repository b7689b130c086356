"""train_vits.py: the VITS objective, spectrograms, MAS, saving, and the time-budgeted loop with resume."""

import glob
import itertools
import json
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

import train_vits as tv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags that keep a CPU run of the tiny model quick; every other flag keeps its real default.
QUICK = ["--device", "cpu", "--batch_size", "2", "--grad_accum", "2", "--disc_channels", "64",
         "--benchmark_samples", "4", "--num_workers", "1", "--warmup_steps", "2", "--d_warmup_steps", "1"]


@pytest.fixture(scope="module")
def tiny_clips(prepared_dataset, tiny_model_dir, tmp_path_factory):
    model, tokenizer = tv.load_voice(tiny_model_dir)
    clips, errors = tv.load_clips(prepared_dataset, 16000, str(tmp_path_factory.mktemp("cache")), 1)
    assert not errors
    return tv.ClipSet(clips, tokenizer)


def tiny_trainer(model_dir, lr=2e-4):
    model, tokenizer = tv.load_voice(model_dir)
    tv.prepare_for_training(model)
    args = tv.parse_args(["--lr", str(lr), "--warmup_steps", "0", "--grad_accum", "1"])
    trainer = tv.VitsTrainer(model, tv.VitsDiscriminator(max_channels=64), args, torch.device("cpu"), "fp32")
    trainer.schedule(1000)
    return trainer, tokenizer


def batch_of(clipset, n):
    return tv.collate([(clipset, i) for i in range(n)], 32)


def test_one_step_gives_every_trainable_parameter_a_gradient(tiny_model_dir, tiny_clips):
    trainer, _ = tiny_trainer(tiny_model_dir)
    trainer.micro_step(batch_of(tiny_clips, 2), accum=1, d_only=False)
    missing = [name for name, p in trainer.model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    missing += [name for name, p in trainer.disc.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []
    for part in ("text_encoder", "posterior_encoder", "flow", "decoder", "duration_predictor"):
        assert any(n.startswith(part) for n, _ in trainer.model.named_parameters())


def test_generator_pass_reuses_real_features_with_the_plain_vits_losses_and_gradients(tiny_model_dir, tiny_clips):
    trainer, _ = tiny_trainer(tiny_model_dir)
    batch = batch_of(tiny_clips, 2)
    torch.manual_seed(0)
    terms = trainer.micro_step(batch, accum=1, d_only=False)
    grads = {n: p.grad.clone() for n, p in itertools.chain(trainer.model.named_parameters(),
                                                          trainer.disc.named_parameters()) if p.grad is not None}

    # The plain step: the critic runs on real + fake again in the generator pass.
    torch.manual_seed(0)
    out = tv.generator_forward(trainer.model, batch, 32)
    logits, _ = trainer.disc(torch.cat([out["audio"], out["audio_hat"].detach()]))
    loss_d = tv.discriminator_loss([l[:2] for l in logits], [l[2:] for l in logits])
    logits, features = trainer.disc(torch.cat([out["audio"], out["audio_hat"]]))
    loss_adv = tv.generator_adversarial_loss([l[2:] for l in logits])
    loss_fm = tv.feature_matching_loss([[f[:2] for f in fs] for fs in features], [[f[2:] for f in fs] for fs in features])
    loss_g = (loss_adv + loss_fm + 45 * tv.mel_slice_loss(out, 16000) + out["loss_kl"] + out["loss_dur"])
    assert (terms["d"], terms["adv"], terms["fm"], terms["g"]) == pytest.approx(
        (loss_d.item(), loss_adv.item(), loss_fm.item(), loss_g.item()), rel=1e-6)
    # The critic's gradients come from its own loss only; the generator's match the plain step's.
    names, params = zip(*trainer.disc.named_parameters())
    for name, grad in zip(names, torch.autograd.grad(loss_d, params)):
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5 * float(grad.abs().max()))
    names, params = zip(*[(n, p) for n, p in trainer.model.named_parameters() if n in grads])
    for name, grad in zip(names, torch.autograd.grad(loss_g, params)):
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5 * float(grad.abs().max()))


def test_critic_is_unfrozen_when_the_generator_pass_fails(tiny_model_dir, tiny_clips, monkeypatch):
    trainer, _ = tiny_trainer(tiny_model_dir)
    forward, calls = trainer.disc.forward, []

    def failing_second_call(audio):
        calls.append(audio.shape)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return forward(audio)
    monkeypatch.setattr(trainer.disc, "forward", failing_second_call)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.micro_step(batch_of(tiny_clips, 2), accum=1, d_only=False)
    assert calls[1][0] == 2  # the generator pass runs the critic on the 2 fake rows only
    assert all(p.requires_grad for p in trainer.disc.parameters())


def test_adamw_is_fused_where_supported_and_falls_back(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert tv.make_adamw(params, 1e-3).defaults["fused"] is True  # torch's CPU kernel
    adamw = torch.optim.AdamW

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("fused=True requires all the params to be floating point Tensors of supported devices")
        return adamw(*args, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = tv.make_adamw(params, 1e-3)
    assert not opt.defaults["fused"] and opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["eps"] == 1e-9


def test_fp16_runs_on_cpu_and_an_overflow_is_skipped_counted_and_leaves_the_weights(tiny_model_dir, tiny_clips):
    model, _ = tv.load_voice(tiny_model_dir)
    tv.prepare_for_training(model)
    args = tv.parse_args(["--warmup_steps", "0", "--grad_accum", "1", "--precision", "fp16", "--device", "cpu"])
    precision = tv.resolve_precision(args.precision, torch.device("cpu"))
    trainer = tv.VitsTrainer(model, tv.VitsDiscriminator(max_channels=64), args, torch.device("cpu"), precision)
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

    spec = tv.linear_spectrogram(torch.from_numpy(audio)[None])[0].numpy()
    mel = tv.mel_spectrogram(torch.from_numpy(audio)[None], 16000)[0].numpy()
    assert spec.shape == (513, len(audio) // 256) == magnitude.shape
    np.testing.assert_allclose(spec, magnitude, atol=1e-4)
    np.testing.assert_allclose(mel, expected_mel, atol=1e-4)


def test_clips_with_more_tokens_than_frames_are_dropped_and_counted(tiny_model_dir):
    _, tokenizer = tv.load_voice(tiny_model_dir)
    pcm = np.zeros(16000, dtype=np.int16)
    mel = np.zeros((80, 62), dtype=np.float16)
    clips = tv.ClipSet([("ok", "roj baş", pcm, mel), ("long", "ez bi kurdî diaxivim " * 4, pcm, mel)], tokenizer)
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
    tv.export_voice(trainer.model, tokenizer, trainer.disc, out)
    # The exported voice is the trained one: same speech for the same noise (decoder weight norm folded).
    ids = torch.tensor([tv.token_ids(tokenizer, "Roj baş, tu çawa yî?")])
    speech = []
    for model in (trainer.model, VitsModel.from_pretrained(out)):
        torch.manual_seed(0)
        with torch.no_grad():
            speech.append(model.eval()(input_ids=ids).waveform)
    torch.testing.assert_close(speech[1], speech[0], rtol=0, atol=1e-5)
    spoken = pipeline("text-to-speech", model=out, device="cpu")("Roj baş, tu çawa yî?")
    assert spoken["sampling_rate"] == 16000
    assert spoken["audio"].size > 0 and np.all(np.isfinite(spoken["audio"]))
    # The trainer keeps its decoder weight norm after saving, and the critic reloads.
    assert torch.nn.utils.parametrize.is_parametrized(trainer.model.decoder.upsampler[0])
    assert tv.load_discriminator(os.path.join(out, "discriminator.pt")).max_channels == 64


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_main_writes_models_samples_metrics_and_resumes_exactly(prepared_dataset, tiny_model_dir, tmp_path):
    first = str(tmp_path / "first")
    common = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--epochs", "2", "--logging_steps", "1",
              "--val_size", "2"] + QUICK
    assert tv.main(common + ["--output_dir", first]) == 0
    for path in ("checkpoints/checkpoint_epoch_1.pt", "checkpoints/checkpoint_epoch_2.pt",
                 "checkpoints/best_model/model.safetensors", "final_model/model.safetensors",
                 "final_model/discriminator.pt", "samples/epoch_1/00.wav", "samples/epoch_2/00.wav",
                 "run_config.json"):
        assert os.path.isfile(os.path.join(first, path)), path
    metrics = read_metrics(first)
    assert {"step", "epoch", "mel", "kl", "dur", "adv", "fm", "d", "lr", "samples_per_s"} <= set(metrics[-2])
    # The final voice is the last trained one: the last listening sample is its speech (same noise).
    model, tokenizer = tv.load_voice(os.path.join(first, "final_model"))
    tv.synthesise(model, tokenizer, [tv.DEFAULT_SENTENCES[0]], str(tmp_path / "final_samples"))
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
    assert tv.main(common + ["--output_dir", second, "--resume", epoch1]) == 0
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
    assert tv.main(args) == 0
    assert tv.main(args + ["--resume", "auto", "--max_samples", "8"]) == 2


def test_budget_run_ends_in_time_and_skips_a_corrupt_wav(prepared_dataset, tiny_model_dir, tmp_path, capsys,
                                                         monkeypatch):
    data = str(tmp_path / "data")
    shutil.copytree(prepared_dataset, data)
    with open(os.path.join(data, "wavs", "corrupt.wav"), "wb") as f:
        f.write(b"RIFF\x00\x01\x00\x00WAVEfmt garbage")
    with open(os.path.join(data, "metadata.csv"), "a", encoding="utf-8") as f:
        f.write("corrupt.wav|ez bi kurdî diaxivim\n")
    # The budget's clock counts 2 s a training step, so the deadline falls at a known step on any machine;
    # the time kept back for saving (at least 2 s) covers the step that was already running.
    clock, real_window = [0.0], tv.VitsTrainer.train_window

    def two_second_window(trainer, *args, **kwargs):
        clock[0] += 2.0
        return real_window(trainer, *args, **kwargs)

    monkeypatch.setattr(tv.VitsTrainer, "train_window", two_second_window)
    monkeypatch.setattr(tv.Budget, "used", lambda budget: budget.used_before + clock[0])
    out = str(tmp_path / "run")
    # 100 epochs cannot fit: the deadline, not the plan, must end this run, and before the budget is spent.
    code = tv.main(["--model", tiny_model_dir, "--data_dir", data, "--output_dir", out, "--epochs", "100",
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
    assert tv.main(args + ["--resume", "auto", "--epochs", "3"]) == 0
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
    clips, errors = tv.load_clips(prepared_dataset, 16000, str(tmp_path / "cache"), 1)  # one worker process
    assert errors == [] and [c[0] for c in clips] == tiny_clips.names
    assert all(np.array_equal(c[2], a) and np.array_equal(c[3], m) for c, a, m in
               zip(clips, tiny_clips.audio, tiny_clips.mels))


def test_ctrl_c_asks_to_stop_where_there_is_no_sigterm(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.delattr(signal, "SIGTERM")
    with tv.StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
    assert signal.getsignal(signal.SIGINT) == before


def test_preload_cache_is_reused_and_rebuilt_when_a_clip_changes(prepared_dataset, tmp_path, capsys, monkeypatch):
    data = str(tmp_path / "data")
    shutil.copytree(prepared_dataset, data)
    cache = str(tmp_path / "cache")
    first, _ = tv.load_clips(data, 16000, cache, 1)
    capsys.readouterr()
    cached, _ = tv.load_clips(data, 16000, cache, 1)
    assert "from cache" in capsys.readouterr().out
    for a, b in zip(first, cached):
        assert a[0] == b[0] and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])

    name = first[0][0]
    sf.write(os.path.join(data, "wavs", name), np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    rebuilt, _ = tv.load_clips(data, 16000, cache, 1)
    assert "from cache" not in capsys.readouterr().out
    assert not np.any(dict((c[0], c[2]) for c in rebuilt)[name])
    assert len(glob.glob(os.path.join(cache, "preload_*.npz"))) == 1

    # What psutil reports on every system (the check must not need Linux's /proc/meminfo).
    monkeypatch.setattr(tv.psutil, "virtual_memory", lambda: SimpleNamespace(available=1000, total=2000))
    shutil.rmtree(cache)
    with pytest.raises(tv.TrainingError, match="GiB"):
        tv.load_clips(data, 16000, cache, 1)
