"""voice_quality.py and --best_metric: MCD-DTW, duration ratio, DNSMOS, ASR CER, capped listening samples."""

import json
import math
import os

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from speechmos import dnsmos
from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor

from voicetune.common import speech
from voicetune.voice import models
from voicetune.voice import spectrogram
import train_vits
from voicetune.voice import voice_quality
from conftest import quick, tiny_trainer
from examples.make_release import espeak_clip
from examples.tiny_model import KURMANJI_VOCAB


SR = 16000


@pytest.fixture(scope="module")
def spoken():
    return espeak_clip("ez bi kurdî diaxivim û zimanê me xweş e", SR)


def reference_mcd_dtw(synth, real):
    """The documented MCD-DTW written out plainly: cosine-sum mel-cepstra c1..c24, 10/ln10*sqrt(2*sum),
    a dynamic-programming DTW over steps (1,1), (1,0), (0,1), mean cost along the cheapest path."""
    def cepstra(audio):
        log_mel = spectrogram.mel_spectrogram(torch.from_numpy(voice_quality.trim_edges(audio))[None], SR)[0].numpy().astype(np.float64)
        k = np.arange(80)
        basis = np.array([2 / 80 * np.cos(np.pi * m * (k + 0.5) / 80) for m in range(1, 25)])
        return (basis @ log_mel).T

    a, b = cepstra(synth), cepstra(real)
    cost = np.array([[10 / math.log(10) * math.sqrt(2 * np.sum((x - y) ** 2)) for y in b] for x in a])
    total = np.full((len(a) + 1, len(b) + 1), np.inf)
    total[0, 0] = 0.0
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            total[i, j] = cost[i - 1, j - 1] + min(total[i - 1, j - 1], total[i - 1, j], total[i, j - 1])
    i, j, path = len(a), len(b), []
    while (i, j) != (0, 0):
        path.append(cost[i - 1, j - 1])
        steps = [(total[i - 1, j - 1], i - 1, j - 1), (total[i - 1, j], i - 1, j), (total[i, j - 1], i, j - 1)]
        _, i, j = min(steps)
    return float(np.mean(path))


def test_mcd_dtw_matches_its_documented_definition(spoken):
    other = espeak_clip("roj baş, tu çawa yî", SR, "ku+f2", 140, 70)
    # Short excerpts keep the plain-Python DTW quick.
    synth, real = other[4000:12000], spoken[6000:11000]
    mcd, _ = voice_quality.compare_to_recording(synth, real, SR)
    assert mcd == pytest.approx(reference_mcd_dtw(synth, real), rel=1e-6)


def test_mcd_is_zero_on_itself_small_on_a_stretched_copy_large_on_noise(spoken):
    assert voice_quality.compare_to_recording(spoken, spoken, SR) == (0.0, 1.0)
    # Loudness is c0, which MCD leaves out: a quieter copy is the same voice.
    assert voice_quality.compare_to_recording(0.5 * spoken, spoken, SR)[0] < 0.5
    stretched, _ = voice_quality.compare_to_recording(librosa.effects.time_stretch(spoken, rate=0.5), spoken, SR)
    noise = np.random.default_rng(0).standard_normal(len(spoken)).astype(np.float32) * 0.1
    noisy, _ = voice_quality.compare_to_recording(noise, spoken, SR)
    other_voice, _ = voice_quality.compare_to_recording(espeak_clip("ez bi kurdî diaxivim û zimanê me xweş e", SR, "ku+f2",
                                                         140, 70), spoken, SR)
    assert 0 < stretched < 6 < other_voice < noisy, (stretched, other_voice, noisy)


def test_duration_ratio_of_a_twice_as_long_clip_is_two_whatever_its_silences(spoken):
    padded = np.concatenate([np.zeros(SR // 2, np.float32), spoken, np.zeros(SR // 4, np.float32)])
    _, ratio = voice_quality.compare_to_recording(librosa.effects.time_stretch(spoken, rate=0.5), padded, SR)
    assert ratio == pytest.approx(2.0, abs=0.05)


def test_dnsmos_rates_clean_speech_above_white_noise(spoken):
    # 4.6 s: speechmos doubles it to 9.2 s and scores a single 9.01 s window, as we do.
    clean = np.resize(spoken, int(4.6 * SR))
    noise = np.random.default_rng(0).standard_normal(len(clean)).astype(np.float32) * 0.1
    good, bad = voice_quality.dnsmos_scores(clean, SR), voice_quality.dnsmos_scores(noise, SR)
    reference = dnsmos.run(clean, SR)
    assert [good[f"dnsmos_{k}"] for k in ("sig", "bak", "ovrl")] == pytest.approx(
        [reference[f"{k}_mos"] for k in ("sig", "bak", "ovrl")], abs=1e-4)
    for key in ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"):
        assert 1.0 <= bad[key] < good[key] <= 5.0, key


def test_character_error_rate_counts_edits_over_reference_characters():
    # Case and punctuation are not errors; "ş" -> "s" is one substitution, a missing word 4 deletions.
    assert voice_quality.character_error_rate(["Roj baş, tu çawa yî?"], ["roj bas tu çawa yî"]) == pytest.approx(1 / 18)
    assert voice_quality.character_error_rate(["ez bi kurdî", "roj baş"], ["ez bi", "roj baş"]) == pytest.approx(6 / 18)


def test_best_metric_dnsmos_prefers_the_higher_score():
    record = dict(val_mel=1.0, eval_mcd=5.0, eval_dnsmos_ovrl=3.0)
    better = dict(val_mel=2.0, eval_mcd=6.0, eval_dnsmos_ovrl=3.5)
    for metric, best in (("val_mel", record), ("mcd", record), ("dnsmos", better)):
        scores = [voice_quality.selection_score(r, "val", metric) for r in (record, better)]
        assert min(scores) == voice_quality.selection_score(best, "val", metric), metric


def test_speaking_from_text_is_repeatable_and_capped(tiny_model_dir):
    model, tokenizer = models.load_voice(tiny_model_dir)
    ids = speech.token_ids(tokenizer, "ez bi kurdî diaxivim")
    free = voice_quality.speak_ids(model, ids, max_frames=1e9, seed=3)
    np.testing.assert_array_equal(free, voice_quality.speak_ids(model, ids, max_frames=1e9, seed=3))
    # Durations are scaled down together; each token's ceil() may add one frame.
    capped = voice_quality.speak_ids(model, ids, max_frames=len(free) // 256 // 4, seed=3)
    assert len(capped) <= (len(free) // 256 // 4 + len(ids)) * 256 < len(free)


def test_best_metric_other_than_val_mel_needs_eval_clips(capsys):
    with pytest.raises(SystemExit):
        train_vits.parse_args(["--best_metric", "mcd", "--eval_clips", "0"])
    assert "--best_metric mcd needs --eval_clips above 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_asr_dir(tmp_path_factory):
    """A tiny random Wav2Vec2ForCTC with a Kurmanji character vocabulary: plumbing only, it cannot hear."""
    out = str(tmp_path_factory.mktemp("asr"))
    vocab = {"<pad>": 0, "|": 1} | {ch: i + 2 for i, ch in enumerate(KURMANJI_VOCAB[2:])}
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    tokenizer = Wav2Vec2CTCTokenizer(os.path.join(out, "vocab.json"), word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=SR)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=16, conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4),
                            num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, pad_token_id=0)
    Wav2Vec2ForCTC(config).save_pretrained(out)
    return out


def test_epoch_metrics_are_logged_and_best_metric_mcd_keeps_the_lowest(prepared_dataset, tiny_model_dir,
                                                                       tiny_asr_dir, tmp_path, monkeypatch, capsys):
    # The real metrics, except MCD: 5, 3, 4 over the three epochs, so epoch 2 is the best model whatever
    # the validation mel says.
    real = voice_quality.evaluate_quality
    mcds, weights = iter([5.0, 3.0, 4.0]), []

    def patched(model, clipset, n_clips):
        weights.append(model.text_encoder.embed_tokens.weight.detach().clone())
        return dict(real(model, clipset, n_clips), mcd=next(mcds))

    monkeypatch.setattr(voice_quality, "evaluate_quality", patched)
    out = str(tmp_path / "run")
    assert train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "3",
                    "--eval_clips", "1", "--best_metric", "mcd", "--asr_model", tiny_asr_dir] + quick(benchmark_samples=0)) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        epochs = [r for r in map(json.loads, f) if "eval_mcd" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert [r["eval_mcd"] for r in epochs] == [5.0, 3.0, 4.0]
    for record in epochs:
        for key in ("val_mel", "eval_dur_ratio", "eval_dur_ratio_std", "eval_dnsmos_sig", "eval_dnsmos_bak",
                    "eval_dnsmos_ovrl", "asr_cer"):
            assert math.isfinite(record[key]), key
        assert 0 < record["eval_dur_ratio"] <= voice_quality.MAX_DURATION_RATIO + 0.1
        assert record["eval_dur_ratio_std"] == 0.0  # one clip
        assert 1 <= record["eval_dnsmos_ovrl"] <= 5
        assert record["asr_cer"] >= 0
    assert "eval_mcd 3 | eval_dur_ratio" in capsys.readouterr().out
    best = load_file(os.path.join(out, "checkpoints", "best_model", "model.safetensors"))
    assert torch.equal(best["text_encoder.embed_tokens.weight"], weights[1])
    assert not torch.equal(weights[1], weights[2])


def test_listening_samples_of_a_diverged_model_are_capped(tiny_model_dir, tmp_path):
    trainer, tokenizer = tiny_trainer(tiny_model_dir), speech.load_tokenizer(tiny_model_dir)
    # Durations e^6 = 400 frames a token: a 13 s sentence, as a diverging model predicts far longer ones.
    trainer.model.duration_predictor.register_forward_hook(lambda module, inputs, out: out + 6.0)
    [path] = voice_quality.synthesise(trainer.model, tokenizer, ["Roj baş."], str(tmp_path), max_seconds=1.0)
    audio, sr = sf.read(path)
    tokens = len(tokenizer("Roj baş.").input_ids)
    assert 0 < len(audio) <= sr + tokens * spectrogram.HOP  # ceil() adds at most a frame per token
