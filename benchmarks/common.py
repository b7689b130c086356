"""Shared helpers of the benchmarks: speech-like Kurmanji training sets, models, memory readings.

A benchmark data set is what prepare_data.py writes (`wavs/*.wav`, 16 kHz mono PCM_16, and
`metadata.csv` with `name.wav|text`), so train_vits.py reads it exactly as it reads real data.
The speech is real Kurmanji from espeak-ng (`-v ku`): a pool of every sentence of
examples/make_release.py in every espeak voice, then each clip is one pool entry (sometimes two joined)
with its own speed, gain and background noise, so thousands of clips take seconds, not hours.
"""

import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `python benchmarks/bench_*.py` from anywhere imports the scripts

from examples.make_release import SENTENCES, VOICES, espeak_clip  # noqa: E402
from examples.tiny_model import KURMANJI_VOCAB, make_tiny_model  # noqa: E402
from voicetune.common.speech import clean_text  # noqa: E402

DATA_DIR = os.path.join(ROOT, "benchmarks", "data")  # git-ignored
SAMPLING_RATE = 16000


# ----------------------------------------------------------------------------------------------------
# Data

def speech_pool(sr=SAMPLING_RATE, cache_dir=DATA_DIR):
    """[(text, float32 audio)] of every sentence in every espeak-ng voice; cached as an npz."""
    path = os.path.join(cache_dir, f"espeak_pool_{sr}.npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            texts, lengths, audio = list(z["texts"]), z["lengths"], z["audio"]
        return [(str(t), a) for t, a in zip(texts, np.split(audio, np.cumsum(lengths)[:-1]))]
    vocab = set(KURMANJI_VOCAB[1:])
    jobs = []
    for k, voice in enumerate(VOICES):
        for sentence in SENTENCES:
            text, _ = clean_text(sentence, vocab)
            if text:
                jobs.append((text, voice, 150 + (k * 7) % 36, 35 + (k * 11) % 30))
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        audio = list(pool.map(lambda j: espeak_clip(j[0], sr, j[1], j[2], j[3]), jobs))
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, texts=np.array([j[0] for j in jobs]), lengths=np.array([len(a) for a in audio]),
             audio=np.concatenate(audio))
    os.replace(tmp, path)
    return [(j[0], a) for j, a in zip(jobs, audio)]


def vary(pool, rng, sr=SAMPLING_RATE):
    """One new clip: a pool entry (30%: two joined), another speed, gain and noise floor."""
    parts = [pool[rng.randrange(len(pool))] for _ in range(2 if rng.random() < 0.3 else 1)]
    text = " ".join(t for t, _ in parts)
    gap = np.zeros(int(0.15 * sr), np.float32)
    audio = np.concatenate([x for _, a in parts for x in (a, gap)][:-1])
    speed = rng.uniform(0.85, 1.2)  # linear-interpolation resampling: faster and higher, or slower and lower
    grid = np.arange(0, len(audio) - 1, speed)
    audio = np.interp(grid, np.arange(len(audio)), audio).astype(np.float32)
    audio *= rng.uniform(0.3, 1.0) / max(1e-3, float(np.abs(audio).max()))
    noise = np.random.default_rng(rng.randrange(2**31)).standard_normal(len(audio)).astype(np.float32)
    audio += noise * 10 ** (rng.uniform(-70, -50) / 20)
    return text, np.clip(audio, -1.0, 1.0)


def make_dataset(out_dir, n_clips, seed=0):
    """A prepared training folder of `n_clips` speech-like clips; reused when it already holds them."""
    metadata = os.path.join(out_dir, "metadata.csv")
    if os.path.isfile(metadata):
        with open(metadata, encoding="utf-8") as f:
            if sum(1 for line in f if line.strip()) == n_clips:
                return out_dir
    pool = speech_pool()
    wavs = os.path.join(out_dir, "wavs")
    os.makedirs(wavs, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n_clips):
        text, audio = vary(pool, rng)
        name = f"clip_{i:06d}.wav"
        sf.write(os.path.join(wavs, name), audio, SAMPLING_RATE, subtype="PCM_16")
        rows.append(f"{name}|{text}\n")
    # metadata.csv last: a run killed while writing WAVs is regenerated next time.
    with open(f"{metadata}.tmp{os.getpid()}", "w", encoding="utf-8") as f:
        f.writelines(rows)
    os.replace(f"{metadata}.tmp{os.getpid()}", metadata)
    return out_dir


def dataset_dir(n_clips, seed=0):
    return os.path.join(DATA_DIR, f"kmr_{n_clips}_seed{seed}")


# ----------------------------------------------------------------------------------------------------
# Models (never downloaded)

def model_dir(size):
    """Folder holding a random-initialised VitsModel + the Kurmanji tokenizer: 'tiny' or 'full' (MMS sizes)."""
    out = os.path.join(DATA_DIR, "models", size)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    tmp = out + f".tmp{os.getpid()}"
    make_tiny_model(tmp)
    if size == "full":
        torch.manual_seed(0)
        tokenizer = VitsTokenizer.from_pretrained(tmp)
        # VitsConfig() defaults are the MMS architecture (hidden 192, 6 encoder layers, 16 WaveNet layers...).
        VitsModel(VitsConfig(vocab_size=len(tokenizer))).save_pretrained(tmp)
    elif size != "tiny":
        raise ValueError(f"model size {size!r}: choose tiny or full")
    try:
        os.replace(tmp, out)
    except OSError:  # another process built it meanwhile
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------
# Memory (psutil, so the benchmarks run on Windows too)

def rss_bytes():
    return psutil.Process().memory_info().rss


def reset_peak_rss():
    """Reset Linux's peak-RSS mark (VmHWM); False where the system has no such reset (Windows, macOS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    """The process's peak RSS: Windows's peak working set, Linux's VmHWM, else getrusage's maximum."""
    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):
        return info.peak_wset
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
