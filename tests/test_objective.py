"""The VITS objective as the original trains it: duration loss, token ids, int16 audio, critic files."""

import json
import math
import os
import shutil

import numpy as np
import soundfile as sf
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, VitsTokenizer, pipeline

import train_vits as tv
from examples.tiny_model import KURMANJI_VOCAB
from prepare_data import load_vocab, token_ids


@pytest.fixture(scope="module")
def duration_predictor(tiny_model_dir):
    """The tiny voice's stochastic duration predictor, every weight random (the affine flows start at 0)."""
    model, _ = tv.load_voice(tiny_model_dir)
    dp = model.duration_predictor.eval()  # no dropout: both sides see the same network
    torch.manual_seed(3)
    with torch.no_grad():
        for flows in (dp.flows, dp.post_flows):
            flows[0].translate.normal_(0, 0.5)
            flows[0].log_scale.normal_(0, 0.5)
    return dp


def duration_inputs(lengths=(7, 4), channels=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_mask = tv.sequence_mask(torch.tensor(lengths), max(lengths)).unsqueeze(1).float()
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
        ours = tv.duration_nll(duration_predictor, hidden, x_mask, durations)
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
        latents, _ = tv.flows_forward(dp.flows, torch.cat([log_durations, torch.randn(2, 1, 6)], 1), x_mask, x)
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
    model, tokenizer = tv.load_voice(n_pad_voice)
    vocab = tokenizer.get_vocab()
    assert tokenizer.pad_token == "n" and vocab["n"] == 0
    expected = [blank_interleaved(vocab, text) for text in PAD_LETTER_SENTENCES]
    plain = VitsTokenizer.from_pretrained(n_pad_voice)
    assert plain("nan").input_ids != expected[0], "VitsTokenizer no longer splits on its pad letter: the check is void"

    pcm, mel = np.zeros(16000, np.int16), np.zeros((80, 62), np.float16)
    clips = tv.ClipSet([(f"{i}.wav", text, pcm, mel) for i, text in enumerate(PAD_LETTER_SENTENCES)], tokenizer)
    assert [list(ids) for ids in clips.tokens] == expected
    prepare_tokenizer, _ = load_vocab(n_pad_voice)
    assert [token_ids(prepare_tokenizer, text) for text in PAD_LETTER_SENTENCES] == expected

    # The listening samples speak the same ids.
    spoken = []
    model.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: spoken.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    tv.synthesise(model, tokenizer, PAD_LETTER_SENTENCES, str(tmp_path / "samples"))
    assert spoken == expected

    # An exported voice gives the same ids to whoever reloads it.
    out = str(tmp_path / "voice")
    tv.export_voice(model, tokenizer, tv.VitsDiscriminator(max_channels=64), out)
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
        clips, errors = tv.load_clips(str(tmp_path / "data"), 16000, str(tmp_path / "cache"), 1)
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
    disc = tv.VitsDiscriminator(max_channels=64)
    with torch.no_grad():
        for name, p in disc.named_parameters():
            if name.endswith("original0"):
                p.mul_(torch.rand_like(p) + 0.5)  # g no longer |v|: a lost g would show
    audio = torch.randn(2, 1, 4096) * 0.3
    with torch.no_grad():
        expected, _ = disc(audio)
    for kind, path in critic_files(disc, str(tmp_path)).items():
        loaded = tv.load_discriminator(path)
        with torch.no_grad():
            logits, _ = loaded(audio)
        for a, b in zip(logits, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=kind)

    broken = torch.load(str(tmp_path / "mms.pt"), weights_only=True)
    del broken["model"]["module.discriminators.0.conv_post.bias"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(tv.TrainingError, match="missing.*discriminators.0.conv_post.bias"):
        tv.load_discriminator(str(tmp_path / "broken.pth"))
