"""The VITS objective as the original trains it: duration loss, token ids, int16 audio, critic files."""

import itertools
import json
import math
import os
import shutil
import signal

import numpy as np
import soundfile as sf
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, VitsTokenizer, pipeline

import clip_data
import models
import objective
import planning
import run_errors
import spectrogram
import train_vits
import vits_trainer
import voice_quality
from examples.tiny_model import KURMANJI_VOCAB
from speech import load_vocab, token_ids


@pytest.fixture(scope="module")
def duration_predictor(tiny_model_dir):
    """The tiny voice's stochastic duration predictor, every weight random (the affine flows start at 0)."""
    model, _ = models.load_voice(tiny_model_dir)
    dp = model.duration_predictor.eval()  # no dropout: both sides see the same network
    torch.manual_seed(3)
    with torch.no_grad():
        for flows in (dp.flows, dp.post_flows):
            flows[0].translate.normal_(0, 0.5)
            flows[0].log_scale.normal_(0, 0.5)
    return dp


def duration_inputs(lengths=(7, 4), channels=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_mask = objective.sequence_mask(torch.tensor(lengths), max(lengths)).unsqueeze(1).float()
    hidden = torch.randn(len(lengths), channels, max(lengths), generator=g)
    durations = torch.randint(0, 9, (len(lengths), 1, max(lengths)), generator=g).float() * x_mask
    return hidden, x_mask, durations


def original_vits_nll(dp, x, x_mask, w):
    """jaywalnut310/vits StochasticDurationPredictor.forward(reverse=False), written out as there."""
    flip = "flip"
    flows = [dp.flows[0]] + [f for conv_flow in dp.flows[1:] for f in (conv_flow, flip)]
    post_flows = [dp.post_flows[0]] + [f for conv_flow in dp.post_flows[1:] for f in (conv_flow, flip)]

    def run(flow, z, g):
        if flow == flip:
            return torch.flip(z, [1]), 0
        return flow(z, x_mask, global_conditioning=g)

    x = dp.conv_pre(x)
    x = dp.conv_dds(x, x_mask)
    x = dp.conv_proj(x) * x_mask
    logdet_tot_q = 0
    h_w = dp.post_conv_pre(w)
    h_w = dp.post_conv_dds(h_w, x_mask)
    h_w = dp.post_conv_proj(h_w) * x_mask
    e_q = torch.randn(w.size(0), 2, w.size(2)) * x_mask
    z_q = e_q
    for flow in post_flows:
        z_q, logdet_q = run(flow, z_q, x + h_w)
        logdet_tot_q += logdet_q
    z_u, z1 = torch.split(z_q, [1, 1], 1)
    u = torch.sigmoid(z_u) * x_mask
    z0 = (w - u) * x_mask
    logdet_tot_q += torch.sum((F.logsigmoid(z_u) + F.logsigmoid(-z_u)) * x_mask, [1, 2])
    logq = torch.sum(-0.5 * (math.log(2 * math.pi) + (e_q ** 2)) * x_mask, [1, 2]) - logdet_tot_q
    logdet_tot = 0
    z0 = torch.log(torch.clamp_min(z0, 1e-5)) * x_mask  # the Log flow
    logdet_tot += torch.sum(-z0, [1, 2])
    z = torch.cat([z0, z1], 1)
    for flow in flows:
        z, logdet = run(flow, z, x)
        logdet_tot = logdet_tot + logdet
    nll = torch.sum(0.5 * (math.log(2 * math.pi) + (z ** 2)) * x_mask, [1, 2]) - logdet_tot
    return nll + logq


def test_duration_loss_is_the_original_vits_formula(duration_predictor):
    hidden, x_mask, durations = duration_inputs()
    with torch.no_grad():
        torch.manual_seed(7)
        ours = objective.duration_nll(duration_predictor, hidden, x_mask, durations)
        torch.manual_seed(7)
        expected = original_vits_nll(duration_predictor, hidden, x_mask, durations)
        torch.manual_seed(7)
        library = duration_predictor(hidden, x_mask, durations=durations)  # transformers' flow order
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(library, expected, rtol=1e-3), "the check cannot tell the two flow orders apart"


def test_inference_path_inverts_the_training_flows(duration_predictor, monkeypatch):
    """Log-durations pushed through the training-direction flows come back from the model's own
    reverse=True path (the one that speaks), so training shapes the density that inference samples."""
    dp = duration_predictor
    hidden, x_mask, _ = duration_inputs(lengths=(6, 6))
    log_durations = torch.randn(2, 1, 6) * x_mask
    with torch.no_grad():
        x = dp.conv_proj(dp.conv_dds(dp.conv_pre(hidden), x_mask)) * x_mask
        latents, _ = objective.flows_forward(dp.flows, torch.cat([log_durations, torch.randn(2, 1, 6)], 1), x_mask, x)
        monkeypatch.setattr(torch, "randn", lambda *shape, **kw: latents.clone())
        recovered = dp(hidden, x_mask, reverse=True, noise_scale=1.0)
    torch.testing.assert_close(recovered, log_durations, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Token ids: every character with a blank around it, also for MMS's pad letter.

@pytest.fixture(scope="module")
def n_pad_voice(tiny_model_dir, tmp_path_factory):
    """The tiny voice with an MMS-like vocabulary: id 0 (pad and blank) is the letter "n", as for Kurmanji."""
    out = str(tmp_path_factory.mktemp("n_pad_voice"))
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    letters = [ch for ch in KURMANJI_VOCAB if ch not in ("_", "n")]
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({ch: i for i, ch in enumerate(["n"] + letters)}, f, ensure_ascii=False)
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.pop("added_tokens_decoder", None)
    config["pad_token"] = "n"
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False)
    return out


# Begin, end and double the pad letter; the last holds none.
PAD_LETTER_SENTENCES = ["nan", "ew dinnivîse û dixwîne", "sibe ez ê biçim"]


def blank_interleaved(vocab, text):
    ids = [0]
    for ch in text:
        ids += [vocab[ch], 0]
    return ids


def test_pad_letter_sentences_get_every_blank_in_training_and_when_exported(n_pad_voice, tmp_path):
    model, tokenizer = models.load_voice(n_pad_voice)
    vocab = tokenizer.get_vocab()
    assert tokenizer.pad_token == "n" and vocab["n"] == 0
    expected = [blank_interleaved(vocab, text) for text in PAD_LETTER_SENTENCES]
    plain = VitsTokenizer.from_pretrained(n_pad_voice)
    assert plain("nan").input_ids != expected[0], "VitsTokenizer no longer splits on its pad letter: the check is void"

    pcm, mel = np.zeros(16000, np.int16), np.zeros((80, 62), np.float16)
    clips = clip_data.ClipSet([(f"{i}.wav", text, pcm, mel) for i, text in enumerate(PAD_LETTER_SENTENCES)], tokenizer)
    assert [list(ids) for ids in clips.tokens] == expected
    prepare_tokenizer, _ = load_vocab(n_pad_voice)
    assert [token_ids(prepare_tokenizer, text) for text in PAD_LETTER_SENTENCES] == expected

    # The listening samples speak the same ids.
    spoken = []
    model.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: spoken.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    voice_quality.synthesise(model, tokenizer, PAD_LETTER_SENTENCES, str(tmp_path / "samples"))
    assert spoken == expected

    # An exported voice gives the same ids to whoever reloads it.
    out = str(tmp_path / "voice")
    models.export_voice(model, tokenizer, models.VitsDiscriminator(max_channels=64), out)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert [reloaded(text).input_ids for text in PAD_LETTER_SENTENCES] == expected
    tts = pipeline("text-to-speech", model=out, device="cpu")
    assert [tts.preprocess(text)["input_ids"][0].tolist() for text in PAD_LETTER_SENTENCES] == expected


# ----------------------------------------------------------------------------------------------------
# Audio and critic files.

def test_16_bit_wav_survives_preload_and_cache_bit_exactly(tmp_path, capsys):
    rng = np.random.default_rng(0)
    quiet = rng.integers(-1, 2, 8000)  # +-1 LSB dither: truncation would turn it into silence
    loud = np.round(32767 * np.sin(np.arange(8000) * 0.01)).astype(np.int64) + rng.integers(-1, 2, 8000)
    pcm = np.clip(np.concatenate([quiet, loud, [32767, -32768, -32767, 1, -1, 0]]), -32768, 32767).astype(np.int16)
    os.makedirs(tmp_path / "data" / "wavs")
    sf.write(str(tmp_path / "data" / "wavs" / "a.wav"), pcm, 16000, subtype="PCM_16")
    (tmp_path / "data" / "metadata.csv").write_text("a.wav|roj baş\n", encoding="utf-8")
    for source in ("decoded", "from cache"):
        clips, errors = clip_data.load_clips(str(tmp_path / "data"), 16000, str(tmp_path / "cache"), 1)
        assert (source == "from cache") == ("from cache" in capsys.readouterr().out)
        assert not errors and clips[0][2].dtype == np.int16
        np.testing.assert_array_equal(clips[0][2], pcm)


def critic_files(disc, folder):
    """`disc` saved as our discriminator.pt, an original MMS D_*.pth and finetune-hf-vits files with and
    without weight norm."""
    ours = disc.state_dict()
    weight_normed = {k.replace("parametrizations.weight.original0", "weight_g")
                      .replace("parametrizations.weight.original1", "weight_v"): v for k, v in ours.items()}
    plain = {k: v for k, v in weight_normed.items() if not k.endswith((".weight_g", ".weight_v"))}
    for name, module in disc.named_modules():
        if hasattr(module, "parametrizations"):
            plain[f"{name}.weight"] = module.weight.detach().clone()  # remove_weight_norm folds g * v / |v|
    hf = {k.replace("conv_post", "final_conv"): v for k, v in weight_normed.items()}
    hf_plain = {"discriminator." + k.replace("conv_post", "final_conv"): v for k, v in plain.items()}
    files = dict(ours=ours, mms={"model": {"module." + k: v for k, v in weight_normed.items()}, "iteration": 1},
                 hf_weight_norm=hf, hf_plain=hf_plain)
    for name, state in files.items():
        torch.save(state, os.path.join(folder, f"{name}.pt"))
    return {name: os.path.join(folder, f"{name}.pt") for name in files}


def test_every_kind_of_critic_file_loads_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    disc = models.VitsDiscriminator(max_channels=64)
    with torch.no_grad():
        for name, p in disc.named_parameters():
            if name.endswith("original0"):
                p.mul_(torch.rand_like(p) + 0.5)  # g no longer |v|: a lost g would show
    audio = torch.randn(2, 1, 4096) * 0.3
    with torch.no_grad():
        expected, _ = disc(audio)
    for kind, path in critic_files(disc, str(tmp_path)).items():
        loaded = models.load_discriminator(path)
        with torch.no_grad():
            logits, _ = loaded(audio)
        for a, b in zip(logits, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=kind)

    broken = torch.load(str(tmp_path / "mms.pt"), weights_only=True)
    del broken["model"]["module.discriminators.0.conv_post.bias"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(run_errors.TrainingError, match="missing.*discriminators.0.conv_post.bias"):
        models.load_discriminator(str(tmp_path / "broken.pth"))


# ----------------------------------------------------------------------------------------------------
# The training step and the loop.

def make_trainer(model_dir, *flags):
    model, _ = models.load_voice(model_dir)
    models.prepare_for_training(model)
    args = train_vits.parse_args(["--lr", "2e-3", "--warmup_steps", "0", "--grad_accum", "1"] + list(flags))
    torch.manual_seed(0)
    trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"), "fp32")
    trainer.schedule(1000)
    return trainer


def short_batch(clips, n=4, segment_frames=32):
    """The n shortest clips: every step below runs the whole generator on them."""
    shortest = sorted(range(len(clips)), key=clips.frames)[:n]
    return clip_data.collate([(clips, i) for i in shortest], segment_frames)


def test_critic_learns_to_score_real_slices_above_generated_ones(tiny_model_dir, tiny_clips):
    trainer = make_trainer(tiny_model_dir, "--lr", "1e-2", "--segment_frames", "16")
    batch = short_batch(tiny_clips, 2, 16)
    for _ in range(10):
        assert trainer.train_window([batch], d_only=True) is not None
    torch.manual_seed(1)
    with torch.no_grad():
        out = objective.generator_forward(trainer.model.eval(), batch, 16)
        real, _ = trainer.disc(out["audio"])
        fake, _ = trainer.disc(out["audio_hat"])
    # Least squares: real towards 1, generated towards 0, in every sub-discriminator.
    margins = torch.stack([r.mean() - f.mean() for r, f in zip(real, fake)])
    assert torch.all(margins > 0) and margins.mean() > 0.3, margins


def test_decoded_audio_and_mel_slices_are_the_same_stretch(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = make_trainer(tiny_model_dir)
    batch = short_batch(tiny_clips)
    seen = {}
    trainer.model.posterior_encoder.register_forward_hook(lambda m, args, out: seen.update(z=out[0]))
    trainer.model.decoder.register_forward_pre_hook(lambda m, args: seen.update(decoded=args[0]))
    torch.manual_seed(5)
    out = objective.generator_forward(trainer.model, batch, 32)
    for b in range(len(batch["frames"])):
        # Where the target mel slice sits in the clip ...
        mel = batch["mel"][b]
        starts = [s for s in range(int(batch["frames"][b]) - 31) if torch.equal(mel[:, s:s + 32], out["mel"][b])]
        assert len(starts) == 1
        start = starts[0]
        # ... is where the audio slice and the decoded latent slice come from.
        torch.testing.assert_close(out["audio"][b, 0], batch["audio"][b, start * 256:(start + 32) * 256])
        torch.testing.assert_close(seen["decoded"][b], seen["z"][b, :, start:start + 32])
        # and the audio slice's own mel is the target (edges aside: the slice has no context there)
        own = spectrogram.mel_spectrogram(out["audio"][b], 16000)[0]
        torch.testing.assert_close(own[:, 2:-2], out["mel"][b][:, 2:-2].float(), atol=2e-2, rtol=0)


def test_generator_loss_terms_are_the_vits_formulas_and_leave_the_critic_alone(tiny_model_dir, tiny_clips):
    trainer = make_trainer(tiny_model_dir)
    batch = short_batch(tiny_clips, 2)
    torch.manual_seed(2)
    with torch.no_grad():
        out = objective.generator_forward(trainer.model, batch, 32)
        real_logits, real_features = trainer.disc(out["audio"])
        fake_logits, fake_features = trainer.disc(out["audio_hat"])
        mel_hat = spectrogram.mel_spectrogram(out["audio_hat"][:, 0], 16000)
    expected = dict(
        d=sum(torch.mean((1 - r) ** 2) + torch.mean(f ** 2) for r, f in zip(real_logits, fake_logits)),
        adv=sum(torch.mean((1 - f) ** 2) for f in fake_logits),
        fm=2 * sum(torch.mean(torch.abs(r - f)) for rs, fs in zip(real_features, fake_features)
                   for r, f in zip(rs, fs)),
        mel=torch.mean(torch.abs(mel_hat - out["mel"])))
    expected["g"] = expected["adv"] + expected["fm"] + 45 * expected["mel"] + out["loss_kl"] + out["loss_dur"]
    assert expected["fm"] > 0.01  # an untrained voice does not sound like the recording

    # The critic's gradient is that of its own loss alone: the generator's backward adds nothing to it.
    torch.manual_seed(2)
    out, terms = trainer.critic_backward(batch, accum=1, keep_graph=True)
    critic_alone = [p.grad.clone() for p in trainer.disc.parameters()]
    terms.update(trainer.generator_backward(out, accum=1))
    for key, value in expected.items():
        assert terms[key] == pytest.approx(float(value), rel=1e-4), key
    for p, alone in zip(trainer.disc.parameters(), critic_alone):
        torch.testing.assert_close(p.grad, alone)


def brute_force_path(values, n_tokens, n_frames):
    """Best monotonic path by enumerating where each token after the first starts."""
    best, best_path = -np.inf, None
    for starts in itertools.combinations(range(1, n_frames), n_tokens - 1):
        bounds = (0,) + starts + (n_frames,)
        path = np.zeros((n_tokens, n_frames))
        for token in range(n_tokens):
            path[token, bounds[token]:bounds[token + 1]] = 1
        score = (values[:n_tokens, :n_frames] * path).sum()
        if score > best:
            best, best_path = score, path
    return best_path


def test_alignment_is_the_most_likely_path_and_its_durations_fill_each_clip():
    g = torch.Generator().manual_seed(1)
    lengths = [(3, 7), (5, 9), (1, 5), (4, 4)]  # (tokens, frames), unequal in a padded batch
    tokens, frames = torch.tensor([t for t, _ in lengths]), torch.tensor([f for _, f in lengths])
    z_p, m_p = torch.randn(4, 2, 9, generator=g), torch.randn(4, 2, 5, generator=g)
    logs_p = 0.5 * torch.randn(4, 2, 5, generator=g)
    x_mask = objective.sequence_mask(tokens, 5).unsqueeze(1).float()
    y_mask = objective.sequence_mask(frames, 9).unsqueeze(1).float()
    path = objective.monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask)

    # log N(z_p[:, t] | m_p[:, l], exp(logs_p[:, l])) summed over channels, for every (token l, frame t)
    log_likelihood = torch.distributions.Normal(m_p.unsqueeze(3), logs_p.exp().unsqueeze(3)).log_prob(
        z_p.unsqueeze(2)).sum(1)
    durations = path.sum(2)
    for b, (n_tokens, n_frames) in enumerate(lengths):
        expected = np.zeros((5, 9))
        expected[:n_tokens, :n_frames] = brute_force_path(log_likelihood[b].numpy(), n_tokens, n_frames)
        np.testing.assert_array_equal(path[b].numpy(), expected)
        assert durations[b].sum() == n_frames
        assert torch.all(durations[b, :n_tokens] >= 1) and torch.all(durations[b, n_tokens:] == 0)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tiny_model_dir, tiny_clips, monkeypatch):
    trainer = make_trainer(tiny_model_dir, "--max_bad_steps", "2")
    batch = short_batch(tiny_clips, 2)
    before = {k: v.clone() for k, v in list(trainer.model.state_dict().items()) + list(
        trainer.disc.state_dict().items())}
    # Only the generator's loss is NaN: the critic has already stepped (VITS's order) and keeps its update;
    # the generator's update is dropped.
    monkeypatch.setattr(objective, "mel_slice_loss", lambda out, sr: torch.tensor(float("nan")))
    assert trainer.train_window([batch]) is None
    assert (trainer.step, trainer.skipped_steps) == (0, 1)
    after = dict(list(trainer.model.state_dict().items()) + list(trainer.disc.state_dict().items()))
    assert all(torch.equal(before[k], after[k]) for k in trainer.model.state_dict())
    assert not all(torch.equal(before[k], after[k]) for k in trainer.disc.state_dict())
    assert all(p.grad is None for p in itertools.chain(trainer.model.parameters(), trainer.disc.parameters()))
    with pytest.raises(run_errors.TrainingError, match="2 non-finite training steps in a row"):
        trainer.train_window([batch])
    assert trainer.skipped_steps == 2


def test_learning_rate_warms_up_then_decays_and_the_critics_solo_phase_spares_the_generator(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, "--lr", "1e-3", "--warmup_steps", "3")
    trainer.schedule(12, d_warmup_steps=4)
    # No forward and no gradients: only the schedule moves.
    trainer.generator_outputs = lambda batch, grad=True: None
    trainer.critic_backward = lambda batch, accum, keep_graph: (None, dict(d=0.0))
    trainer.generator_backward = lambda out, accum: dict(g=0.0)
    used_g, used_d = [], []
    for step in range(12):
        used_d.append(trainer.opt_d.param_groups[0]["lr"])
        if step >= 4:
            used_g.append(trainer.opt_g.param_groups[0]["lr"])
        trainer.train_window([{}], d_only=step < 4)

    def warmup_cosine(step, warmup, total):
        if step < warmup:
            return 1e-3 * step / warmup
        return 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    # The critic trains its 4 solo steps at its full rate, then decays; the generator warms up after them.
    assert used_d == pytest.approx([1e-3] * 4 + [warmup_cosine(s - 4, 0, 8) for s in range(4, 12)], abs=1e-12)
    assert used_g == pytest.approx([warmup_cosine(s, 3, 8) for s in range(8)], abs=1e-12)


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
        # Training itself is tested above; here only which clips each optimizer step gets matters.
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
