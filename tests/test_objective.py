"""objective.py: the VITS objective as the original trains it: the KL term, the durations the alignment gives,
the duration loss, the generator's and the critic's loss terms and their weights, the mel and audio slices,
and the terms a step logs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voicetune.night import clip_data
from voicetune.night import objective
from voicetune.voice import models
from voicetune.voice import spectrogram
from conftest import ragged_items, short_batch, tiny_trainer


def plain_vits_kl(z_p, logs_q, m_p, logs_p, z_mask):
    """jaywalnut310/vits losses.py kl_loss, as written there (z_mask [B, 1, T])."""
    kl = logs_p - logs_q - 0.5
    kl += 0.5 * ((z_p - m_p) ** 2) * torch.exp(-2. * logs_p)
    kl = torch.sum(kl * z_mask)
    return kl / torch.sum(z_mask)


class Recorder:
    """Wraps a function: records every call's arguments and result, then returns the result."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        result = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, result))
        return result


def test_kl_term_is_the_original_vits_kl_loss(tiny_model_dir, tiny_clips, monkeypatch):
    g = torch.Generator().manual_seed(0)
    B, C, T = 3, 5, 11
    z_p, logs_q, m_p = (torch.randn(B, C, T, generator=g, dtype=torch.float64) for _ in range(3))
    logs_p = 0.5 * torch.randn(B, C, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([11, 7, 2])
    z_mask = (torch.arange(T)[None, :] < lengths[:, None]).unsqueeze(1).double()  # [B, 1, T], ragged
    expected = plain_vits_kl(z_p, logs_q, m_p, logs_p, z_mask)
    assert float(objective.kl_loss(z_p, logs_q, m_p, logs_p, z_mask)) == pytest.approx(float(expected), abs=1e-6)
    # In float32 too, as the trainer runs it.
    f = [t.float() for t in (z_p, logs_q, m_p, logs_p, z_mask)]
    assert float(objective.kl_loss(*f)) == pytest.approx(float(expected), abs=1e-5)

    # generator_forward's loss_kl: the same formula on the pass's own z_p (flow output), logs_q (posterior)
    # and the prior (text encoder) expanded to frames through the alignment path.
    model, _ = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    model.eval()
    seen = {}
    model.text_encoder.register_forward_hook(lambda m, i, o: seen.update(text=o))
    model.posterior_encoder.register_forward_hook(lambda m, i, o: seen.update(post=o))
    model.flow.register_forward_hook(lambda m, i, o: seen.update(flow=o))
    align = Recorder(objective.monotonic_alignment)
    kl = Recorder(objective.kl_loss)
    monkeypatch.setattr(objective, "monotonic_alignment", align)
    monkeypatch.setattr(objective, "kl_loss", kl)
    batch = clip_data.collate(ragged_items(tiny_clips), 32)
    torch.manual_seed(0)
    with torch.no_grad():
        out = objective.generator_forward(model, batch, 32)
    assert len(kl.calls) == 1 and len(align.calls) == 1
    path = align.calls[0][2].double()  # [B, L, T]
    m_p = seen["text"].prior_means.transpose(1, 2).double()
    logs_p = seen["text"].prior_log_variances.transpose(1, 2).double()
    logs_q = seen["post"][2].double()
    z_p = seen["flow"].double()
    T = z_p.size(2)
    frames = torch.tensor([tiny_clips.frames(i) for _, i in ragged_items(tiny_clips)])
    y_mask = (torch.arange(T)[None, :] < frames[:, None]).unsqueeze(1).double()
    expected = plain_vits_kl(z_p, logs_q, torch.matmul(m_p, path), torch.matmul(logs_p, path), y_mask)
    assert float(out["loss_kl"]) == pytest.approx(float(expected), rel=1e-5, abs=1e-5)


def test_durations_are_the_alignments_frames_per_token_and_add_up_to_each_clip(tiny_model_dir, tiny_clips,
                                                                               monkeypatch):
    model, _ = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    align = Recorder(objective.monotonic_alignment)
    dur = Recorder(objective.duration_nll)
    monkeypatch.setattr(objective, "monotonic_alignment", align)
    monkeypatch.setattr(objective, "duration_nll", dur)
    items = ragged_items(tiny_clips)
    batch = clip_data.collate(items, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        objective.generator_forward(model, batch, 32)
    assert len(dur.calls) == 1 and len(align.calls) == 1
    args, kwargs, _ = dur.calls[0]
    durations = kwargs.get("durations", args[3] if len(args) > 3 else None)
    path = align.calls[0][2]  # [B, tokens, frames]
    assert durations.shape == (len(items), 1, batch["input_ids"].size(1))
    durations = durations[:, 0, :].double()
    assert torch.equal(durations, path.sum(2).double())
    # Each clip's frames, from its own mel (known values), every one of them given to some token.
    frames = [cs.mels[i].shape[1] for cs, i in items]
    assert len(set(frames)) == len(frames)
    assert durations.sum(1).tolist() == frames == batch["frames"].tolist()
    tokens = [len(cs.tokens[i]) for cs, i in items]
    for b, n in enumerate(tokens):
        assert torch.all(durations[b, n:] == 0)
        assert torch.all(durations[b] == durations[b].round()) and torch.all(durations[b] >= 0)


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


def test_critic_learns_to_score_real_slices_above_generated_ones(tiny_model_dir, tiny_clips):
    trainer = tiny_trainer(tiny_model_dir, "--lr", "1e-2", "--segment_frames", "16")
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
    trainer = tiny_trainer(tiny_model_dir, "--lr", "2e-3")
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


def test_a_clip_shorter_than_the_slice_is_scored_against_the_mel_of_silence(tiny_model_dir, tiny_clips):
    trainer = tiny_trainer(tiny_model_dir, "--lr", "2e-5")
    short = tiny_clips.subset([0])
    frames = 10
    short.audio = [short.audio[0][:frames * spectrogram.HOP]]
    short.mels = [short.mels[0][:, :frames]]
    batch = clip_data.collate([(short, 0)], 32)
    out = objective.generator_forward(trainer.model, batch, 32)
    silence = spectrogram.mel_spectrogram(torch.zeros(1, 4 * spectrogram.HOP), 16000)[0, :, 0]
    assert silence.mean() == pytest.approx(-9.66, abs=0.01)
    torch.testing.assert_close(out["mel"][0, :, frames:], silence[:, None].expand(-1, 32 - frames))
    torch.testing.assert_close(out["mel"][0, :, :frames], torch.from_numpy(short.mels[0]).float())


def test_generator_loss_terms_are_the_vits_formulas_and_leave_the_critic_alone(tiny_model_dir, tiny_clips):
    trainer = tiny_trainer(tiny_model_dir, "--lr", "2e-3")
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


def test_c_mel_and_c_kl_weight_the_generator_loss(tiny_model_dir, tiny_clips):
    batch = clip_data.collate(ragged_items(tiny_clips, 2), 32)
    terms = {}
    for c_mel, c_kl in ((45.0, 1.0), (10.0, 3.0), (10.0, 1.0)):
        trainer = tiny_trainer(tiny_model_dir, "--c_mel", str(c_mel), "--c_kl", str(c_kl))
        torch.manual_seed(123)
        t = trainer.train_window([batch])
        assert t is not None
        expected = t["adv"] + t["fm"] + c_mel * t["mel"] + c_kl * t["kl"] + t["dur"]
        assert t["g"] == pytest.approx(expected, rel=1e-5, abs=1e-5), (c_mel, c_kl)
        terms[c_mel, c_kl] = t
    # Same weights, batch and seed: the terms agree, and g moves by exactly the change of weight x term.
    a, b, c = terms[45.0, 1.0], terms[10.0, 3.0], terms[10.0, 1.0]
    for key in ("adv", "fm", "mel", "kl", "dur", "d"):
        assert a[key] == pytest.approx(b[key], rel=1e-5) == c[key], key
    assert a["g"] - c["g"] == pytest.approx((45.0 - 10.0) * a["mel"], rel=1e-4)
    assert b["g"] - c["g"] == pytest.approx((3.0 - 1.0) * a["kl"], rel=1e-4)


def test_a_steps_logged_terms_are_the_means_of_its_micro_batches_losses(tiny_model_dir, tiny_clips, monkeypatch):
    """What metrics.jsonl and the progress bar show for a step of two micro-batches: each term the plain
    mean of the two micro-batches' own values (read back to the host once, at the step's end)."""
    trainer = tiny_trainer(tiny_model_dir, "--grad_accum", "2")
    seen = {}

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.setdefault(name, []).append(float(out.detach()))
            return out
        monkeypatch.setattr(objective, name, wrapped)

    recording("discriminator_loss", objective.discriminator_loss)
    recording("generator_adversarial_loss", objective.generator_adversarial_loss)
    recording("feature_matching_loss", objective.feature_matching_loss)
    recording("mel_slice_loss", objective.mel_slice_loss)
    forward = objective.generator_forward

    def recorded_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.setdefault("kl", []).append(float(out["loss_kl"].detach()))
        seen.setdefault("dur", []).append(float(out["loss_dur"].detach()))
        return out
    monkeypatch.setattr(objective, "generator_forward", recorded_forward)
    batches = [clip_data.collate([(tiny_clips, i) for i in pair], 16) for pair in ((0, 1), (2, 3))]
    terms = trainer.train_window(batches)
    assert terms["d"] == pytest.approx(np.mean(seen["discriminator_loss"]), rel=1e-6)
    assert terms["adv"] == pytest.approx(np.mean(seen["generator_adversarial_loss"]), rel=1e-6)
    assert terms["fm"] == pytest.approx(np.mean(seen["feature_matching_loss"]), rel=1e-6)
    assert terms["mel"] == pytest.approx(np.mean(seen["mel_slice_loss"]), rel=1e-6)
    # The generator's forward ran for the critic, then again for its own pass: its last two are the step's.
    for key in ("kl", "dur"):
        assert len(seen[key]) == 4 and terms[key] == pytest.approx(np.mean(seen[key][2:]), rel=1e-6)
    c_mel, c_kl = trainer.args.c_mel, trainer.args.c_kl
    g = [a + f + c_mel * m + c_kl * k + d for a, f, m, k, d in zip(
        seen["generator_adversarial_loss"], seen["feature_matching_loss"], seen["mel_slice_loss"], seen["kl"][2:],
        seen["dur"][2:])]
    assert terms["g"] == pytest.approx(np.mean(g), rel=1e-5)
