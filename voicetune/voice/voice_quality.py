"""Hearing and measuring the voice: numbered listening samples (spoken by speak_lines.speak_files, durations
capped), and held-out clips spoken from their text alone compared with their recordings (MCD-DTW, duration
ratio, DNSMOS, CER)."""

import functools
import math
import os
import unicodedata

import librosa
import numpy as np
import soundfile as sf
import torch
from scipy.fft import dct
from scipy.spatial.distance import cdist
from speechmos import dnsmos
from transformers import AutoModelForCTC, AutoProcessor

from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import speech
from voicetune.voice import speak_lines
from voicetune.voice import speaking
from voicetune.voice import spectrogram

DEFAULT_SENTENCES = [
    "Ez bi kurdî diaxivim.",
    "Roj baş, tu çawa yî?",
    "Zimanê me dewlemend û xweş e.",
    "Pirtûka min li ser maseyê ye.",
]


def synthesise(model, tokenizer, sentences, out_dir, seed=0, max_seconds=speaking.SAMPLE_MAX_SECONDS, speaker_id=None):
    """Speak each sentence to out_dir/NN.wav with fixed noise, so epochs can be compared by ear; speaker_id:
    whose voice, in a multi-speaker model."""
    voice = speaking.TorchVoice(model, tokenizer, speaker_id, max_seconds)
    named = [(run_files.sentence_sample(i), sentence) for i, sentence in enumerate(sentences)]
    return speak_lines.speak_files(voice, named, out_dir, seed)


def read_sentences(path):
    if path is None:
        return DEFAULT_SENTENCES
    with open(path, encoding="utf-8") as f:
        sentences = [line.strip() for line in f if line.strip()]
    if not sentences:
        raise run_errors.TrainingError(f"--sample_sentences {path}: no sentences in the file")
    return sentences
MCD_ORDER = 24
MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)


# An untrained duration predictor can ask for minutes of audio: a spoken clip is cut at this many times
# its recording's length, which also caps the duration ratio.
MAX_DURATION_RATIO = 4.0


def trim_edges(audio):
    """Silent edges cut as prepare_data.py cuts them; never shorter than one STFT window."""
    trimmed = speech.trim_silence(audio)
    audio = trimmed if len(trimmed) >= spectrogram.N_FFT else audio
    return np.pad(audio, (0, max(0, spectrogram.N_FFT - len(audio))))


def mel_cepstrum(audio, sampling_rate):
    """[frames, 24]: c1..c24 of the mel-cepstrum of each frame of the training log-mel."""
    log_mel = spectrogram.mel_spectrogram(torch.from_numpy(np.asarray(audio, dtype=np.float32))[None], sampling_rate)[0]
    cepstrum = dct(log_mel.numpy().astype(np.float64), type=2, norm="ortho", axis=0)
    cepstrum *= math.sqrt(2.0 / spectrogram.N_MELS)
    return cepstrum[1:MCD_ORDER + 1].T


def compare_to_recording(synth, real, sampling_rate):
    """(MCD-DTW in dB, duration ratio synth / real) of a spoken clip against its recording."""
    synth, real = trim_edges(synth), trim_edges(real)
    cost = MCD_SCALE * cdist(mel_cepstrum(synth, sampling_rate), mel_cepstrum(real, sampling_rate))
    _, path = librosa.sequence.dtw(C=cost, backtrack=True)
    return float(cost[path[:, 0], path[:, 1]].mean()), len(synth) / len(real)


@functools.lru_cache(maxsize=1)
def dnsmos_model():
    """speechmos's DNSMOS with the ONNX models shipped inside the package: nothing is downloaded."""
    folder = os.path.join(os.path.dirname(os.path.abspath(dnsmos.__file__)), "dnsmos_models")
    return dnsmos.DNSMOS(os.path.join(folder, "sig_bak_ovr.onnx"), os.path.join(folder, "model_v8.onnx"))


def dnsmos_scores(audio, sampling_rate):
    """DNSMOS P.835 SIG, BAK, OVRL (1-5), as Microsoft's dnsmos_local.py and speechmos compute them: the
    mean over 9.01 s windows 1 s apart of the polynomial-mapped network outputs. A shorter clip is tiled
    to one window (they tile it by doubling and average every window of the copies: shifts of the same
    repeated audio, several times the work)."""
    if sampling_rate != dnsmos.SR:
        audio = librosa.resample(audio, orig_sr=sampling_rate, target_sr=dnsmos.SR)
    window = int(dnsmos.INPUT_LENGTH * dnsmos.SR)
    audio = np.resize(np.clip(audio, -1.0, 1.0).astype(np.float32), max(len(audio), window))
    hops = int(np.floor(len(audio) / dnsmos.SR) - dnsmos.INPUT_LENGTH) + 1
    segments = np.stack([audio[i * dnsmos.SR:i * dnsmos.SR + window] for i in range(hops)])
    model = dnsmos_model()
    raw = model.onnx_sess.run(None, {"input_1": segments})[0]
    sig, bak, ovrl = model.get_polyfit_val(raw[:, 0], raw[:, 1], raw[:, 2], False)
    return dict(dnsmos_sig=float(np.mean(sig)), dnsmos_bak=float(np.mean(bak)), dnsmos_ovrl=float(np.mean(ovrl)))


@torch.no_grad()
def speak_ids(model, ids, max_frames, seed, speaker_id=None):
    """Waveform of token ids by the inference path (duration predictor, flow reversed, decoder), fixed
    noise; at most max_frames frames (speaking.capped_durations)."""
    device = next(model.parameters()).device
    forked = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with speaking.capped_durations(model, max_frames), forked:
        torch.manual_seed(seed)
        waveform = model(input_ids=torch.as_tensor(ids, device=device)[None], speaker_id=speaker_id).waveform[0]
    return waveform.float().cpu().numpy()


def evaluate_quality(model, clipset, n_clips):
    """Mean MCD-DTW, duration ratio (mean and spread) and DNSMOS of the first n_clips held-out clips,
    each spoken from its token ids alone with the same noise every epoch, by its own speaker in a
    multi-speaker voice (whose MCD is also given per speaker: mcd_speaker_<id>)."""
    return summarise_quality(quality_per_clip(model, clipset, n_clips))


def summarise_quality(clips):
    """evaluate_quality's figures from quality_per_clip's lists ({} for no clips)."""
    if not clips["mcd"]:
        return {}
    by_speaker = {}
    for speaker, mcd in zip(clips["speaker"], clips["mcd"]):
        if speaker is not None:
            by_speaker.setdefault(speaker, []).append(mcd)
    return dict(mcd=float(np.mean(clips["mcd"])), dur_ratio=float(np.mean(clips["dur_ratio"])),
                dur_ratio_std=float(np.std(clips["dur_ratio"])),
                **{k: float(np.mean(clips[k])) for k in ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl")},
                **{f"mcd_speaker_{k}": float(np.mean(v)) for k, v in sorted(by_speaker.items())})


def quality_per_clip(model, clipset, n_clips):
    """{"mcd", "dur_ratio", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "speaker"}: one value per clip of the
    first n_clips, each spoken from its token ids alone with noise seeded by its place (the same every time)."""
    was_training = model.training
    model.eval()
    sampling_rate = model.config.sampling_rate
    clips = dict(mcd=[], dur_ratio=[], dnsmos_sig=[], dnsmos_bak=[], dnsmos_ovrl=[], speaker=[])
    for i in range(min(n_clips, len(clipset))):
        real = clipset.audio[i].astype(np.float32) / 32768.0
        speaker = clipset.speaker_ids[i] if clipset.speaker_ids else None
        synth = speak_ids(model, clipset.tokens[i], MAX_DURATION_RATIO * len(real) / spectrogram.HOP, seed=i,
                          speaker_id=speaker)
        mcd, ratio = compare_to_recording(synth, real, sampling_rate)
        clips["mcd"].append(mcd)
        clips["dur_ratio"].append(ratio)
        for key, value in dnsmos_scores(synth, sampling_rate).items():
            clips[key].append(value)
        clips["speaker"].append(speaker)
    model.train(was_training)
    return clips


def selection_score(record, set_name, metric):
    """What checkpoints/best_model/ minimises (--best_metric): validation mel, MCD, or minus DNSMOS OVRL."""
    if metric == "val_mel":
        return record[run_files.metric_key(set_name, "mel")]
    if metric == "mcd":
        return record[run_files.metric_key(set_name, "mcd")]
    return -record[run_files.metric_key(set_name, "dnsmos_ovrl")]


@functools.lru_cache(maxsize=1)
def load_asr(name_or_dir, lang=None):
    """A CTC recogniser and its processor, on the CPU. A multilingual MMS model (facebook/mms-1b-all: adapter
    layers, a vocabulary per language) gets the adapter and vocabulary of `lang` (e.g. kmr-script_latin, as
    `target_lang` / `load_adapter` choose them); a model saved with one language baked in is used as it is."""
    try:
        processor = AutoProcessor.from_pretrained(name_or_dir)
        model = AutoModelForCTC.from_pretrained(name_or_dir).eval()
    except OSError as err:
        raise run_errors.TrainingError(f"--asr_model {name_or_dir}: cannot load a CTC model and processor "
                                       f"({err})") from err
    vocab = getattr(processor.tokenizer, "vocab", None)
    multilingual = isinstance(vocab, dict) and vocab and all(isinstance(v, dict) for v in vocab.values())
    if lang and multilingual:
        if lang not in vocab:
            raise run_errors.TrainingError(f"--asr_lang {lang}: {name_or_dir} has no vocabulary for it (it has "
                                           f"{len(vocab)} languages, e.g. {', '.join(sorted(vocab)[:5])})")
        processor.tokenizer.set_target_lang(lang)
        if getattr(model.config, "adapter_attn_dim", None):
            try:
                model.load_adapter(lang)
            except (OSError, ValueError) as err:
                raise run_errors.TrainingError(f"--asr_lang {lang}: cannot load the adapter of {name_or_dir} "
                                               f"({str(err).splitlines()[0]})") from err
    return processor, model


@torch.no_grad()
def transcribe(paths, asr_model, lang=None):
    processor, model = load_asr(asr_model, lang)
    sampling_rate = processor.feature_extractor.sampling_rate
    texts = []
    for path in paths:
        audio, rate = sf.read(path, dtype="float32")
        if rate != sampling_rate:
            audio = librosa.resample(audio, orig_sr=rate, target_sr=sampling_rate)
        logits = model(**processor(audio, sampling_rate=sampling_rate, return_tensors="pt")).logits
        texts.append(processor.batch_decode(logits.argmax(-1))[0])
    return texts


def cer_text(text):
    """Lowercase letters and apostrophes, one space between words: what a CTC recogniser writes."""
    kept = "".join(ch if ch.isalpha() or ch == "'" else " " for ch in unicodedata.normalize("NFC", text.lower()))
    return " ".join(kept.split())


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def character_error_rate(references, hypotheses):
    """Character edits (insertions, deletions, substitutions) over reference characters, all sentences."""
    refs, hyps = [cer_text(t) for t in references], [cer_text(t) for t in hypotheses]
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / max(1, sum(len(r) for r in refs))
