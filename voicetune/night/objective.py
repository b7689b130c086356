"""The VITS objective, as the original VITS trains it (jaywalnut310/vits, models.py and losses.py):
posterior encoder on the linear spectrogram, flow, monotonic alignment search, KL, the stochastic
duration loss, mel L1 on decoded slices, and the least-squares adversarial and feature-matching losses.
`transformers`' VitsModel only synthesises: these run its modules in the training direction."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from voicetune.night.alignment import monotonic_alignment
from voicetune.voice import spectrogram


def sequence_mask(lengths, max_length):
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


def expand_prior(m_p, logs_p, path):
    """The prior's mean and log-std per frame, [B, C, T], through the path; fp32 with autocast off (the
    matmul would return fp16 under autocast)."""
    with torch.autocast(m_p.device.type, enabled=False):
        return torch.matmul(m_p.float(), path), torch.matmul(logs_p.float(), path)


def random_slices(lengths, segment_frames):
    max_start = torch.clamp(lengths - segment_frames, min=0)
    return (torch.rand(lengths.shape, device=lengths.device) * (max_start + 1).float()).long()


def slice_frames(x, starts, segment):
    """[B, C, T] -> [B, C, segment] starting at `starts` (per item)."""
    idx = starts[:, None] + torch.arange(segment, device=x.device)[None, :]
    return torch.gather(x, 2, idx[:, None, :].expand(-1, x.size(1), -1))


def generator_forward(model, batch, segment_frames):
    """One VITS generator pass. Returns the decoded slices, their targets and the non-adversarial losses."""
    ids, id_mask, frames = batch["input_ids"], batch["attention_mask"], batch["frames"]
    spec = spectrogram.linear_spectrogram(batch["audio"])
    x_mask = id_mask.unsqueeze(1).to(spec.dtype)  # [B, 1, L]
    y_mask = sequence_mask(frames, spec.size(2)).unsqueeze(1).to(spec.dtype)  # [B, 1, T]

    text = model.text_encoder(input_ids=ids, padding_mask=x_mask.transpose(1, 2), attention_mask=id_mask)
    hidden = text.last_hidden_state.transpose(1, 2)
    m_p, logs_p = text.prior_means.transpose(1, 2), text.prior_log_variances.transpose(1, 2)
    g = speaker_embedding(model, batch)

    z, m_q, logs_q = model.posterior_encoder(spec, y_mask, g)
    z_p = model.flow(z, y_mask, g)

    path = monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask)  # [B, L, T]
    durations = path.sum(2).unsqueeze(1)  # [B, 1, L]
    dur_nll = duration_nll(model.duration_predictor, hidden, x_mask, durations.to(hidden.dtype), g)
    loss_dur = torch.sum(dur_nll.float() / torch.sum(x_mask))

    m_p, logs_p = expand_prior(m_p, logs_p, path)

    starts = random_slices(frames, segment_frames)
    audio_hat = model.decoder(slice_frames(z, starts, segment_frames), g)
    audio = slice_frames(batch["audio"].unsqueeze(1), starts * spectrogram.HOP, segment_frames * spectrogram.HOP)
    return dict(audio=audio, audio_hat=audio_hat, mel=mel_target(batch, starts, segment_frames, model.config),
                loss_dur=loss_dur, loss_kl=kl_loss(z_p.float(), logs_q.float(), m_p, logs_p, y_mask))


def speaker_embedding(model, batch):
    """[B, 256, 1] embeddings of the batch's speakers, as VITS's train_ms.py conditions on them (emb_g(sid));
    None for a single-speaker voice."""
    if model.config.num_speakers < 2:
        return None
    return model.embed_speaker(batch["speaker_ids"]).unsqueeze(-1)


def mel_target(batch, starts, segment_frames, config):
    """The recorded log-mel of each slice. Where a clip shorter than the slice ends, the target is the mel
    of silence, as the zeros its audio is padded with sound, not the 0 its mel is padded with."""
    mel = slice_frames(batch["mel"], starts, segment_frames)
    frame = starts[:, None] + torch.arange(segment_frames, device=mel.device)[None, :]
    heard = (frame < batch["frames"][:, None])[:, None, :]  # [B, 1, segment]
    silence = spectrogram.silence_mel(config.sampling_rate, mel.device).to(mel.dtype)[None, :, None]
    return torch.where(heard, mel, silence)


def flows_forward(flows, z, mask, cond):
    """Training direction of a duration flow stack in the original VITS order.

    VITS builds [ElementwiseAffine, (ConvFlow, Flip) x n]: no flip after the affine flow. transformers'
    modules hold the flows without the Flips, and its training branch flips after every flow, a density
    its own inference branch (which inverts the original order) never uses; so we run them ourselves.
    """
    logdet = 0
    for i, flow in enumerate(flows):
        z, flow_logdet = flow(z, mask, global_conditioning=cond)
        logdet = logdet + flow_logdet
        if i > 0:
            z = torch.flip(z, [1])
    return z, logdet


def duration_nll(dp, hidden, x_mask, durations, g=None):
    """Stochastic duration predictor NLL per item (original VITS), with the module's own submodules.

    dp: transformers' VitsStochasticDurationPredictor; hidden [B, C, L] and the speaker embedding g
    [B, 256, 1] (both detached here, as in VITS); durations [B, 1, L] in frames. A variational bound:
    dequantise the durations with noise from the posterior flows, then score log-duration under the main flows.
    """
    x = dp.conv_pre(hidden.detach())
    if g is not None:
        x = x + dp.cond(g.detach())
    x = dp.conv_proj(dp.conv_dds(x, x_mask)) * x_mask
    h_w = dp.post_conv_proj(dp.post_conv_dds(dp.post_conv_pre(durations), x_mask)) * x_mask
    e_q = torch.randn(durations.size(0), 2, durations.size(2), device=x.device, dtype=x.dtype) * x_mask
    z_q, logdet_q = flows_forward(dp.post_flows, e_q, x_mask, x + h_w)
    z_u, z1 = torch.split(z_q, [1, 1], 1)
    u = torch.sigmoid(z_u) * x_mask
    logdet_q = logdet_q + torch.sum((F.logsigmoid(z_u) + F.logsigmoid(-z_u)) * x_mask, [1, 2])
    logq = torch.sum(-0.5 * (math.log(2 * math.pi) + e_q ** 2) * x_mask, [1, 2]) - logdet_q
    # Log flow: z0 = log(d - u), whose log-determinant is -z0.
    z0 = torch.log(torch.clamp_min((durations - u) * x_mask, 1e-5)) * x_mask
    z, logdet = flows_forward(dp.flows, torch.cat([z0, z1], 1), x_mask, x)
    logdet = logdet + torch.sum(-z0, [1, 2])
    nll = torch.sum(0.5 * (math.log(2 * math.pi) + z ** 2) * x_mask, [1, 2]) - logdet
    return nll + logq


class GeneratorPass(nn.Module):
    """generator_forward as a module's forward, so that DDP, which only averages the gradients of what
    runs through the forward of the module it wraps, covers every VitsModel part the step calls."""

    def __init__(self, model, segment_frames):
        super().__init__()
        self.model, self.segment_frames = model, segment_frames

    def forward(self, batch):
        return generator_forward(self.model, batch, self.segment_frames)


def kl_loss(z_p, logs_q, m_p, logs_p, mask):
    kl = logs_p - logs_q - 0.5 + 0.5 * (z_p - m_p).pow(2) * torch.exp(-2.0 * logs_p)
    return torch.sum(kl * mask) / torch.sum(mask)


def discriminator_loss(real_logits, fake_logits):
    return sum(torch.mean((1 - r.float()) ** 2) + torch.mean(f.float() ** 2) for r, f in zip(real_logits, fake_logits))


def generator_adversarial_loss(fake_logits):
    return sum(torch.mean((1 - f.float()) ** 2) for f in fake_logits)


def feature_matching_loss(real_features, fake_features):
    return 2 * sum(torch.mean(torch.abs(r.float().detach() - f.float()))
                   for rs, fs in zip(real_features, fake_features) for r, f in zip(rs, fs))


def mel_slice_loss(out, sampling_rate):
    mel_hat = spectrogram.mel_spectrogram(out["audio_hat"].squeeze(1), sampling_rate)
    return F.l1_loss(mel_hat, out["mel"].float())
