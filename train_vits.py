"""Fine-tune a VITS voice (MMS by default) overnight on one GPU, within a wall-clock budget.

`transformers`' VitsModel only synthesises, so the training step is ours, as in the original VITS:
posterior encoder on the linear spectrogram, flow, monotonic alignment search, KL, stochastic duration
loss, mel L1 on decoded slices, and HiFi-GAN multi-period + scale discriminators.

Examples:

    # the real job: MMS Kurmanji on the output of prepare_data.py, sized to 9.5 hours
    python train_vits.py --data_dir training --output_dir training

    # continue an interrupted run with the budget it had left
    python train_vits.py --resume auto

    # several GPUs of one machine (DistributedDataParallel; --batch_size is per GPU)
    torchrun --standalone --nproc_per_node 4 train_vits.py --data_dir training --output_dir training

    # a tiny CPU smoke run (see examples/tiny_model.py and demo.sh)
    python train_vits.py --model example_run/tiny_model --data_dir example_run/data \\
        --output_dir example_run --target_hours 0.03 --device cpu --batch_size 4 --grad_accum 1
"""

import argparse
import contextlib
import copy
import datetime
import functools
import glob
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
import warnings
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import librosa
import numpy as np
import psutil
import soundfile as sf
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monotonic_alignment_search import maximum_path
from scipy.fft import dct
from scipy.spatial.distance import cdist
from speechmos import dnsmos
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import AutoModelForCTC, AutoProcessor, VitsModel

from prepare_data import (AudioError, MetadataError, load_audio, load_tokenizer, read_metadata, token_ids,
                          trim_silence)
from run_folder import (FolderInUse, OutputLock, exit_with_parent, remove_stale_temps, temp_name, worker_setup,
                        written_atomically)

# Spectrogram settings of the original VITS (mel_processing.py); the MMS voices were trained on these.
N_FFT, HOP, WIN, N_MELS, FMIN, FMAX = 1024, 256, 1024, 80, 0.0, 8000.0
SPEC_SETTINGS = dict(n_fft=N_FFT, hop=HOP, win=WIN, n_mels=N_MELS, fmin=FMIN, fmax=FMAX, pad="reflect384")
CACHE_VERSION = 1
SAMPLE_MAX_SECONDS = 30.0  # longest listening sample: a longer one means the durations diverged

DEFAULT_SENTENCES = [
    "Ez bi kurdî diaxivim.",
    "Roj baş, tu çawa yî?",
    "Zimanê me dewlemend û xweş e.",
    "Pirtûka min li ser maseyê ye.",
]


class TrainingError(RuntimeError):
    """A run that cannot go on safely; the message says why and what to do."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's example layout and shows each flag's default, unless its help says it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


AUTO_CPU_BATCH = 8  # --batch_size auto on a CPU, where a bigger micro-batch is no faster per sample


def batch_size_arg(text):
    return text if text == "auto" else int(text)


def build_parser(description=__doc__):
    """All training flags; train_feedback.py builds on the same parser so its flags mean the same."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data_dir", default="training", help="Folder with wavs/ and metadata.csv (filename|text).")
    g.add_argument("--model", default="facebook/mms-tts-kmr-script_latin",
                   help="VitsModel to fine-tune: a Hugging Face name or a local folder.")
    g.add_argument("--discriminator", default=None,
                   help="Pretrained discriminator: an original MMS/VITS D_*.pth, a finetune-hf-vits checkpoint "
                        "(with or without weight norm) or a discriminator.pt saved by this script.")
    g.add_argument("--disc_channels", type=int, default=1024, choices=[64, 128, 256, 512, 1024],
                   help="Widest discriminator layer for a fresh discriminator: 1024 as VITS/MMS; smaller only "
                        "for quick trials with tiny models.")
    g.add_argument("--output_dir", default="training",
                   help="Where checkpoints/, final_model/, samples/, metrics.jsonl and the cache go.")
    g.add_argument("--max_samples", type=int, default=None, help="Use only the first N clips (quick trials).")
    g.add_argument("--val_size", type=int, default=100,
                   help="Held-out clips for validation (at most a tenth of the data).")
    g.add_argument("--sample_sentences", default=None,
                   help="Text file, one sentence a line, synthesised after every epoch (default: built in).")
    g = p.add_argument_group("budget")
    g.add_argument("--target_hours", type=float, default=9.5,
                   help="Wall-clock budget of the whole run, preload and saving included.")
    g.add_argument("--epochs", type=int, default=None, help="Train this many epochs instead of the planned number.")
    g.add_argument("--max_steps", type=int, default=None, help="Stop after this many optimizer steps.")
    g.add_argument("--benchmark_samples", type=int, default=200,
                   help="Samples of real training steps timed to plan the epochs (0: skip, guess from the first epoch).")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=batch_size_arg, default="auto",
                   help="Clips per micro-batch, or 'auto': on one GPU the largest that fits with 10%% of its free "
                        f"memory to spare (tried with real steps on the longest clips), on a CPU or under torchrun "
                        f"{AUTO_CPU_BATCH}; auto keeps {AUTO_CPU_BATCH} x --grad_accum clips per optimizer step by "
                        "lowering --grad_accum. A resumed run keeps the batch it had.")
    g.add_argument("--grad_accum", type=int, default=4, help="Micro-batches per optimizer step.")
    g.add_argument("--lr", type=float, default=2e-5, help="Peak learning rate of both generator and discriminator.")
    g.add_argument("--warmup_steps", type=int, default=500, help="Linear LR warm-up steps before the cosine decay.")
    g.add_argument("--d_warmup_steps", type=int, default=None,
                   help="Steps that train only a fresh discriminator before it may push the generator "
                        "(default 200 without --discriminator, 0 with one).")
    g.add_argument("--c_mel", type=float, default=45.0, help="Weight of the mel L1 loss.")
    g.add_argument("--c_kl", type=float, default=1.0, help="Weight of the KL loss.")
    g.add_argument("--grad_clip", type=float, default=100.0, help="Gradient-norm clip for both networks.")
    g.add_argument("--segment_frames", type=int, default=32,
                   help="Spectrogram frames of each decoded slice (32 x 256 = 8,192 samples in VITS).")
    g.add_argument("--max_bad_steps", type=int, default=20,
                   help="Stop the run after this many non-finite steps in a row.")
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (cuda when available).")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs that have it, else fp16 with a GradScaler; fp32 on CPU (fp16 runs "
                        "there too, slowly: a check of the fp16 path).")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the critic and the HiFi-GAN decoder (the convolutions, most of a step). "
                        "Off: it measured slower on a CPU and no faster on an H100 (README, Performance); the first "
                        "steps wait minutes for the compiler; on Windows it needs a C++ compiler, on a GPU Triton.")
    g.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                   help="Processes that decode clips during the preload.")
    g.add_argument("--seed", type=int, default=1234, help="Seed for shuffling, slicing and initialisation.")
    g = p.add_argument_group("saving and logging")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="'auto' (newest checkpoint in output_dir) or a checkpoint path.")
    g.add_argument("--overwrite", action="store_true",
                   help="Start a fresh run in an output_dir that holds an earlier one, deleting its checkpoints, "
                        "final_model/, samples/ and metrics (default: refuse, and say so).")
    g.add_argument("--keep_checkpoints", type=int, default=3, help="Epoch checkpoints kept on disk.")
    g.add_argument("--logging_steps", type=int, default=20, help="Optimizer steps between metrics.jsonl lines.")
    g = p.add_argument_group("voice quality (every epoch, after validation)")
    g.add_argument("--eval_clips", type=int, default=16,
                   help="Held-out clips spoken from their text alone and compared with the recording (MCD-DTW, "
                        "duration ratio, DNSMOS); 0 turns this off.")
    g.add_argument("--best_metric", default="val_mel", choices=["val_mel", "mcd", "dnsmos"],
                   help="What checkpoints/best_model/ is best at: validation mel loss, MCD-DTW (both lowest) "
                        "or DNSMOS OVRL (highest).")
    g.add_argument("--asr_model", default=None,
                   help="CTC speech recogniser (Hugging Face name or local folder) that transcribes the listening "
                        "samples every epoch; their character error rate is logged as asr_cer. Off by default.")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    for name in ("batch_size", "grad_accum", "segment_frames", "keep_checkpoints", "logging_steps", "epochs",
                 "max_steps", "max_samples"):
        if getattr(args, name) not in (None, "auto") and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("target_hours", "lr", "grad_clip"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            parser.error(f"--{name} must be a positive number, got {getattr(args, name)}")
    for name in ("seed", "val_size"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        parser.error(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args.device}")
    if args.sample_sentences and not os.path.isfile(args.sample_sentences):
        parser.error(f"--sample_sentences: no file at {args.sample_sentences}")
    if args.resume and args.overwrite:
        parser.error("give --resume (continue the run in --output_dir) or --overwrite (start it over), not both")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        parser.error(f"--resume: no checkpoint file at {args.resume}")
    if args.discriminator and not os.path.isfile(args.discriminator):
        parser.error(f"--discriminator: no file at {args.discriminator}")
    if args.benchmark_samples <= 0 and not (args.epochs or args.max_steps):
        parser.error("--benchmark_samples 0 needs --epochs or --max_steps: without a benchmark there is no plan")
    if args.eval_clips < 0:
        parser.error(f"--eval_clips must be 0 or more, got {args.eval_clips}")
    if args.best_metric != "val_mel" and args.eval_clips == 0:
        parser.error(f"--best_metric {args.best_metric} needs --eval_clips above 0")


# ----------------------------------------------------------------------------------------------------
# Spectrograms: exactly the original VITS features, always in fp32 (cuFFT has no bf16).

_MEL_BASIS = {}
_WINDOWS = {}


def linear_spectrogram(audio):
    """Magnitude STFT of a [B, T] float waveform -> [B, 513, T // 256]."""
    audio = audio.float()
    key = str(audio.device)
    if key not in _WINDOWS:
        _WINDOWS[key] = torch.hann_window(WIN, device=audio.device)
    pad = (N_FFT - HOP) // 2
    audio = F.pad(audio.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    with torch.autocast(audio.device.type, enabled=False):
        stft = torch.stft(audio, N_FFT, hop_length=HOP, win_length=WIN, window=_WINDOWS[key],
                          center=False, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    return torch.sqrt(stft.real.pow(2) + stft.imag.pow(2) + 1e-6)


def spec_to_mel(spec, sampling_rate):
    key = (str(spec.device), sampling_rate)
    if key not in _MEL_BASIS:
        basis = librosa.filters.mel(sr=sampling_rate, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
        _MEL_BASIS[key] = torch.from_numpy(basis).float().to(spec.device)
    return torch.log(torch.clamp(torch.matmul(_MEL_BASIS[key], spec), min=1e-5))


def mel_spectrogram(audio, sampling_rate):
    """Log-mel of a [B, T] waveform -> [B, 80, T // 256]."""
    return spec_to_mel(linear_spectrogram(audio), sampling_rate)


# ----------------------------------------------------------------------------------------------------
# Data: every clip decoded once, held in RAM as int16 audio + fp16 log-mel, cached on disk.

def to_int16(audio):
    """Float audio in [-1, 1] as int16, rounded, read back as `/ 32768`: a 16-bit WAV round-trips exactly.

    (Truncating, `(x * 32767).astype(int16)`, would move every sample a step toward zero and turn quiet
    passages into digital silence.)
    """
    return np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def read_clip(job):
    """Worker: decode one wav at the model's rate and compute its log-mel. Never raises."""
    index, path, sampling_rate = job
    try:
        audio = load_audio(path, sampling_rate)
        if len(audio) < HOP:
            raise AudioError("shorter than one spectrogram frame")
        pcm = to_int16(audio)
        mel = mel_spectrogram(torch.from_numpy(pcm.astype(np.float32) / 32768.0)[None], sampling_rate)[0]
        return index, pcm, mel.numpy().astype(np.float16), None
    except (AudioError, OSError, RuntimeError, ValueError) as err:
        return index, None, None, f"{os.path.basename(path)}: {err}"


def _init_worker(parent_pid, parent_started):
    torch.set_num_threads(1)
    exit_with_parent(parent_pid, parent_started)


def cache_key(audio_dir, entries, sampling_rate):
    """Hash of everything that shapes the preloaded arrays: files, sizes, mtimes, spectrogram settings."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, SPEC_SETTINGS, sampling_rate]).encode())
    for name, _ in entries:
        path = os.path.join(audio_dir, name)
        try:
            st = os.stat(path)
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}|missing\n".encode())
    return h.hexdigest()[:16]


def available_ram_bytes():
    """RAM the system can give without swapping, on Linux, Windows and macOS alike."""
    return psutil.virtual_memory().available


def estimate_preload_bytes(paths, sampling_rate):
    """int16 audio + fp16 mel for every clip, from the file headers (no decoding)."""
    samples = 0
    for path in paths:
        try:
            info = sf.info(path)
            samples += int(info.frames * sampling_rate / info.samplerate)
        except (RuntimeError, OSError):
            continue
    return samples * 2 + (samples // HOP) * N_MELS * 2


def decode_all(audio_dir, entries, sampling_rate, num_workers):
    jobs = [(i, os.path.join(audio_dir, name), sampling_rate) for i, (name, _) in enumerate(entries)]
    audio, mels, errors = [None] * len(jobs), [None] * len(jobs), []
    parent = worker_setup()["initargs"]
    with ProcessPoolExecutor(max_workers=max(1, num_workers), initializer=_init_worker, initargs=parent) as pool:
        results = pool.map(read_clip, jobs, chunksize=16)
        for index, pcm, mel, err in tqdm(results, total=len(jobs), desc="preload", unit="clip"):
            audio[index], mels[index] = pcm, mel
            if err:
                errors.append(err)
    return audio, mels, errors


def save_cache(path, names, audio, mels, errors):
    """One uncompressed npz that np.load reads back, written clip by clip.

    Concatenating first would hold a second copy of every clip: twice the RAM the trainer keeps (7 GB
    instead of 3.5 GB at 23 h of audio, benchmarks/bench_preload.py).
    """
    kept = [i for i, a in enumerate(audio) if a is not None]
    small = dict(names=np.array([names[i] for i in kept]), errors=np.array(errors, dtype=str),
                 audio_len=np.array([len(audio[i]) for i in kept], dtype=np.int64),
                 mel_len=np.array([mels[i].shape[1] for i in kept], dtype=np.int64))
    big = dict(audio=(np.int16, (int(small["audio_len"].sum()),), lambda i: audio[i]),
               mel=(np.float16, (int(small["mel_len"].sum()), N_MELS), lambda i: mels[i].T))
    # The zip directory is written as the ZipFile closes, before the file reaches the disk and is renamed.
    with written_atomically(path) as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in small.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, value)
        for key, (dtype, shape, clip) in big.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as f:
                header = dict(descr=np.lib.format.dtype_to_descr(np.dtype(dtype)), fortran_order=False,
                              shape=shape)
                np.lib.format.write_array_header_2_0(f, header)
                for i in kept:
                    f.write(np.ascontiguousarray(clip(i), dtype=dtype).tobytes())


def load_cache(path):
    """The cached clips and errors, or None when the file is damaged (a copy cut short, a failing disk)."""
    try:
        with np.load(path) as z:
            names, errors = list(z["names"]), list(z["errors"])
            audio = np.split(z["audio"], np.cumsum(z["audio_len"])[:-1])
            mels = [m.T for m in np.split(z["mel"], np.cumsum(z["mel_len"])[:-1])]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        print(f"preload: cache {path} is unreadable ({err}): rebuilding it")
        return None
    return {str(n): (a, m) for n, a, m in zip(names, audio, mels)}, [str(e) for e in errors]


def load_clips(data_dir, sampling_rate, cache_dir, num_workers, max_samples=None, audio_subdir="wavs", entries=None):
    """Clips of `data_dir/metadata.csv` as [(name, text, int16 audio, fp16 mel)], plus skipped-clip messages.

    Audio files are looked up in `data_dir/audio_subdir`, in any format soundfile reads, at any rate.
    `entries` [(file, text)] replaces metadata.csv (a feedback folder of NAME.wav + NAME.txt pairs has none).
    """
    metadata = os.path.join(data_dir, "metadata.csv")
    audio_dir = os.path.join(data_dir, audio_subdir)
    if entries is None:
        if not os.path.isfile(metadata):
            raise TrainingError(f"{metadata}: not found (run prepare_data.py first, or pass --data_dir)")
        left_out = Counter()
        try:
            entries = read_metadata(metadata, left_out)
        except MetadataError as err:
            raise TrainingError(str(err)) from None
        if left_out:
            print(f"{metadata}: rows left out: {', '.join(f'{n} {reason}' for reason, n in left_out.items())}")
    if max_samples:
        entries = entries[:max_samples]
    if not entries:
        raise TrainingError(f"{metadata}: no clips listed")
    os.makedirs(cache_dir, exist_ok=True)
    cache = os.path.join(cache_dir, f"preload_{cache_key(audio_dir, entries, sampling_rate)}.npz")
    # Under torchrun rank 0 decodes and writes the cache; the other ranks then read it.
    with main_process_first():
        remove_stale_temps(cache_dir)
        cached = load_cache(cache) if os.path.isfile(cache) else None
        if cached:
            clips, errors = cached
            print(f"preload: {len(clips)} clips from cache {cache}")
        else:
            for stale in glob.glob(os.path.join(cache_dir, "preload_*.npz")):
                os.remove(stale)
            paths = [os.path.join(audio_dir, name) for name, _ in entries]
            # Under torchrun every process on this node holds every clip (each epoch reshuffles them all).
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            need, free = local * estimate_preload_bytes(paths, sampling_rate), available_ram_bytes()
            print(f"preload: {len(entries)} clips, about {need / 2**30:.2f} GiB of RAM"
                  + (f" for {local} processes" if local > 1 else "") + f" ({free / 2**30:.1f} GiB available)")
            if need > 0.8 * free:
                raise TrainingError(f"preload needs about {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB "
                                    "is available: use --max_samples or a machine with more RAM")
            names = [name for name, _ in entries]
            audio, mels, errors = decode_all(audio_dir, entries, sampling_rate, num_workers)
            save_cache(cache, names, audio, mels, errors)
            clips = {n: (a, m) for n, a, m in zip(names, audio, mels) if a is not None}
    for err in errors:
        print(f"skipped clip {err}")
    texts = dict(entries)
    return [(name, texts[name], a, m) for name, (a, m) in clips.items() if name in texts], errors


class ClipSet:
    """Preloaded clips with token ids; items whose tokens outnumber their frames are dropped (MAS needs it)."""

    def __init__(self, clips, tokenizer):
        self.names, self.texts, self.audio, self.mels, self.tokens = [], [], [], [], []
        self.dropped = {}
        for name, text, pcm, mel in clips:
            ids = token_ids(tokenizer, text)
            reason = None
            if len(ids) <= 1:
                reason = "no speakable text"
            elif len(ids) > mel.shape[1]:
                reason = "more tokens than frames"
            if reason:
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
                continue
            self.names.append(name)
            self.texts.append(text)
            self.audio.append(pcm)
            self.mels.append(mel)
            self.tokens.append(np.asarray(ids, dtype=np.int64))

    def __len__(self):
        return len(self.names)

    def frames(self, i):
        return self.mels[i].shape[1]

    def subset(self, indices):
        other = copy.copy(self)
        for attr in ("names", "texts", "audio", "mels", "tokens"):
            setattr(other, attr, [getattr(self, attr)[i] for i in indices])
        return other


def split_validation(clips, val_size):
    """Held-out clips chosen by a hash of their names, so the split is the same on every run and resume."""
    val_size = min(val_size, len(clips) // 10)
    order = sorted(range(len(clips)), key=lambda i: hashlib.sha1(clips.names[i].encode()).hexdigest())
    val = sorted(order[:val_size])
    held = set(val)
    return clips.subset([i for i in range(len(clips)) if i not in held]), clips.subset(val)


def bucket_batches(lengths, batch_size, seed):
    """Length-bucketed batches: similar durations share a batch (little padding), batch order shuffled."""
    rng = random.Random(seed)
    # The jitter mixes clips of nearly equal length across epochs without giving up the bucketing.
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] * (1.0 + 0.1 * rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(items, segment_frames):
    """Pad a batch of (clipset, index) items into tensors; audio covers at least one decoder slice."""
    frames = [cs.frames(i) for cs, i in items]
    max_frames = max(max(frames), segment_frames)
    max_tokens = max(len(cs.tokens[i]) for cs, i in items)
    batch = len(items)
    audio = torch.zeros(batch, max_frames * HOP)
    mel = torch.zeros(batch, N_MELS, max_frames)
    ids = torch.zeros(batch, max_tokens, dtype=torch.long)
    id_mask = torch.zeros(batch, max_tokens, dtype=torch.long)
    for b, (cs, i) in enumerate(items):
        pcm = torch.from_numpy(cs.audio[i][:frames[b] * HOP].astype(np.float32) / 32768.0)
        audio[b, :len(pcm)] = pcm
        mel[b, :, :frames[b]] = torch.from_numpy(cs.mels[i].astype(np.float32))
        ids[b, :len(cs.tokens[i])] = torch.from_numpy(cs.tokens[i])
        id_mask[b, :len(cs.tokens[i])] = 1
    return dict(audio=audio, mel=mel, frames=torch.tensor(frames), input_ids=ids, attention_mask=id_mask)


def to_device(batch, device):
    if device.type != "cuda":
        return batch
    return {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node N` runs N copies of this script, one per GPU, joined by
# torch.distributed. A plain `python train_vits.py` starts no process group and every helper below is a
# no-op for it.

def distributed():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if distributed() else 1


def rank():
    return dist.get_rank() if distributed() else 0


def is_main_process():
    """Rank 0 alone writes checkpoints, models, samples, metrics and prints."""
    return rank() == 0


def launched_processes():
    """Processes torchrun started (its WORLD_SIZE), known before the process group exists; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device):
    """Join torchrun's process group when it started more than one process; a plain run starts none."""
    if launched_processes() <= 1 or distributed():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Rank 0 may work alone for minutes (first preload, validation, saving) while the others wait.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    # Every rank starts from the same weights (DDP copies rank 0's) but draws its own random slices.
    torch.manual_seed(torch.initial_seed() + rank())
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints; every rank's errors still reach stderr


def leave_distributed():
    if distributed():
        dist.destroy_process_group()


def barrier():
    if distributed():
        dist.barrier()


def all_reduce(value, op):
    """A number combined over all ranks (op "min", "max" or "sum"); the number itself without torchrun."""
    if not distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
    return t.item()


def any_rank(flag):
    """True on every rank when `flag` is true on any: all ranks then take the same branch (stop, skip)."""
    return bool(all_reduce(bool(flag), "max"))


def all_ranks(flag):
    return not any_rank(not flag)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a folder name it chose, a report it wrote)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (decoding, writing a cache); the others run it after, reading what it wrote."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def shard_batches(make_batches):
    """make_batches for this rank: every world_size-th batch of the epoch, starting at its rank.

    The epoch's list is the same on every rank (seeded by epoch), so together the ranks train exactly
    its batches; it is first padded by repeating its first batches to a multiple of world_size, so every
    rank takes the same number of optimizer steps. Global step k covers the batches a single process
    would take in k's window of grad_accum x world_size batches.
    """
    n, r = world_size(), rank()
    if n == 1:
        return make_batches

    def make(epoch):
        batches = make_batches(epoch)
        padded = [batches[i % len(batches)] for i in range(math.ceil(len(batches) / n) * n)]
        return padded[r::n]
    return make


def data_parallel(module, device):
    """`module` under DistributedDataParallel when torchrun started several processes, else unchanged.

    DDP averages gradients across ranks during backward, but only of what ran through its forward.
    """
    if not distributed():
        return module
    # The relative-position embeddings of VitsModel's attention get gradients of slices with other
    # strides than DDP's buckets: DDP copies these few values and warns that it does.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------------
# Model: the pretrained generator, HiFi-GAN discriminators, and saving in the transformers format.

def weight_norm(module):
    return nn.utils.parametrizations.weight_norm(module)


def load_voice(name_or_dir):
    try:
        model = VitsModel.from_pretrained(name_or_dir)
        tokenizer = load_tokenizer(name_or_dir)
    except Exception as err:  # a damaged file raises whatever its reader raises (UnpicklingError, SafetensorError)
        raise TrainingError(f"--model {name_or_dir}: cannot load a VITS model and tokenizer "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    return model, tokenizer


def prepare_for_training(model):
    """As the original trainer: no layer drop, weight norm on the HiFi-GAN decoder (removed for saving)."""
    model.config.layerdrop = 0.0
    model.text_encoder.encoder.layerdrop = 0.0
    if not nn.utils.parametrize.is_parametrized(model.decoder.upsampler[0]):
        model.decoder.apply_weight_norm()
    model.train()
    return model


def inference_copy(model):
    """A CPU copy of the generator without decoder weight norm, as the released MMS voices are saved.

    (Removing the parametrization from a deepcopy would also strip it from the original: the
    parametrized class is shared between copies.)
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()
             if not (k.startswith("decoder.") and ".parametrizations.weight." in k)}
    for name, module in model.decoder.named_modules():
        if nn.utils.parametrize.is_parametrized(module, "weight"):
            state[f"decoder.{name}.weight"] = module.weight.detach().cpu()
    export = VitsModel(model.config)
    export.load_state_dict(state)
    return export.eval()


def replace_dir(tmp_dir, final_dir):
    """Swap a fully written folder into place, so a reader never sees a half-written model."""
    old = final_dir + ".old"
    if os.path.isdir(final_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_voice(model, tokenizer, discriminator, out_dir):
    """save_pretrained (loadable by pipeline('text-to-speech')) + discriminator.pt, atomically."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = temp_name(os.path.abspath(out_dir))
    os.mkdir(tmp)
    try:
        inference_copy(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(discriminator.state_dict(), os.path.join(tmp, "discriminator.pt"))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not keep a hidden half-written copy
        raise


def conv_stack(convs, conv_post, x):
    """Leaky-ReLU conv stack of a HiFi-GAN sub-discriminator -> (flat logits, every layer's features)."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), 0.1)
        features.append(x)
    x = conv_post(x)
    features.append(x)
    return torch.flatten(x, 1), features


def scaled(channels, max_channels):
    return max(1, channels * max_channels // 1024)


class PeriodDiscriminator(nn.Module):
    def __init__(self, period, max_channels=1024):
        super().__init__()
        self.period = period
        chans = [1] + [scaled(c, max_channels) for c in (32, 128, 512, 1024, 1024)]
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv2d(chans[i], chans[i + 1], (5, 1), (3, 1) if i < 4 else 1, padding=(2, 0)))
            for i in range(5)])
        self.conv_post = weight_norm(nn.Conv2d(chans[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x):
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), "reflect")
        return conv_stack(self.convs, self.conv_post, x.view(b, c, -1, self.period))


class ScaleDiscriminator(nn.Module):
    def __init__(self, max_channels=1024):
        super().__init__()
        c = [1] + [scaled(n, max_channels) for n in (16, 64, 256, 1024, 1024, 1024)]
        groups = [1] + [scaled(g, max_channels) for g in (4, 16, 64, 256)] + [1]
        kernels, strides = (15, 41, 41, 41, 41, 5), (1, 4, 4, 4, 4, 1)
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv1d(c[i], c[i + 1], kernels[i], strides[i], groups=groups[i], padding=kernels[i] // 2))
            for i in range(6)])
        self.conv_post = weight_norm(nn.Conv1d(c[-1], 1, 3, 1, padding=1))

    def forward(self, x):
        return conv_stack(self.convs, self.conv_post, x)


class VitsDiscriminator(nn.Module):
    """The VITS/MMS critic: one scale discriminator and period discriminators 2, 3, 5, 7, 11.

    `max_channels` below 1024 shrinks every layer alike, for quick trials with tiny generators only:
    pretrained MMS discriminators have 1024.
    """

    def __init__(self, periods=(2, 3, 5, 7, 11), max_channels=1024):
        super().__init__()
        self.max_channels = max_channels
        self.discriminators = nn.ModuleList([ScaleDiscriminator(max_channels)]
                                            + [PeriodDiscriminator(p, max_channels) for p in periods])

    def forward(self, audio):
        """[B, 1, T] -> (list of logits, list of feature lists), one entry per sub-discriminator."""
        outputs = [d(audio) for d in self.discriminators]
        return [o[0] for o in outputs], [o[1] for o in outputs]


def mms_discriminator_state(raw):
    """Rename an original MMS/VITS D_*.pth or a finetune-hf-vits state dict (weight norm or plain weights)
    to our parameter names."""
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    renamed = {}
    for key, value in state.items():
        key = key.replace("module.", "", 1) if key.startswith("module.") else key
        if "discriminators." not in key:
            continue  # some MMS files carry generator weights too
        key = key[key.index("discriminators."):].replace("final_conv", "conv_post")
        key = key.replace(".weight_g", ".parametrizations.weight.original0")
        key = key.replace(".weight_v", ".parametrizations.weight.original1")
        if key.endswith(".weight"):
            # Weight norm removed before saving (finetune-hf-vits): every layer here is weight-normed, and
            # g = |w| over all dims but 0, v = w gives back exactly the same weight.
            base = key[:-len("weight")] + "parametrizations.weight."
            renamed[base + "original0"] = torch.linalg.vector_norm(value, dim=list(range(1, value.dim())),
                                                                   keepdim=True)
            key = base + "original1"
        renamed[key] = value
    return renamed


def load_discriminator(path):
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainingError(f"--discriminator {path}: not a readable checkpoint ({err})") from err
    state = mms_discriminator_state(raw)
    # The widest layer of the first period discriminator tells the size it was built with.
    width = state.get("discriminators.1.convs.4.parametrizations.weight.original1")
    disc = VitsDiscriminator(max_channels=width.shape[0] if width is not None else 1024)
    expected = disc.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or extra or shapes:
        raise TrainingError(f"--discriminator {path}: does not fit the VITS discriminator; "
                            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                            f"unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}, wrong shape {shapes[:8]}")
    disc.load_state_dict(state)
    return disc


# ----------------------------------------------------------------------------------------------------
# The VITS objective.

def sequence_mask(lengths, max_length):
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


def monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask):
    """Most likely monotonic path of frames onto tokens: [B, tokens, frames] of 0/1, no gradient."""
    with torch.no_grad():
        z_p, m_p, logs_p = z_p.float(), m_p.float(), logs_p.float()
        s_p_sq_r = torch.exp(-2 * logs_p)  # [B, C, L]
        # log N(z_p | m_p, s_p) for every (token, frame), expanded as in VITS to four matmuls
        neg_cent1 = torch.sum(-0.5 * math.log(2 * math.pi) - logs_p, [1]).unsqueeze(2)  # [B, L, 1]
        neg_cent2 = torch.matmul(s_p_sq_r.transpose(1, 2), -0.5 * z_p.pow(2))  # [B, L, T]
        neg_cent3 = torch.matmul((m_p * s_p_sq_r).transpose(1, 2), z_p)
        neg_cent4 = torch.sum(-0.5 * m_p.pow(2) * s_p_sq_r, [1]).unsqueeze(2)
        neg_cent = neg_cent1 + neg_cent2 + neg_cent3 + neg_cent4
        mask = x_mask.transpose(1, 2) * y_mask  # [B, L, T]
        return maximum_path(neg_cent, mask.float()).to(z_p.dtype)


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
    spec = linear_spectrogram(batch["audio"])
    x_mask = id_mask.unsqueeze(1).to(spec.dtype)  # [B, 1, L]
    y_mask = sequence_mask(frames, spec.size(2)).unsqueeze(1).to(spec.dtype)  # [B, 1, T]

    text = model.text_encoder(input_ids=ids, padding_mask=x_mask.transpose(1, 2), attention_mask=id_mask)
    hidden = text.last_hidden_state.transpose(1, 2)
    m_p, logs_p = text.prior_means.transpose(1, 2), text.prior_log_variances.transpose(1, 2)

    z, m_q, logs_q = model.posterior_encoder(spec, y_mask)
    z_p = model.flow(z, y_mask)

    path = monotonic_alignment(z_p, m_p, logs_p, x_mask, y_mask)  # [B, L, T]
    durations = path.sum(2).unsqueeze(1)  # [B, 1, L]
    dur_nll = duration_nll(model.duration_predictor, hidden, x_mask, durations.to(hidden.dtype))
    loss_dur = torch.sum(dur_nll.float() / torch.sum(x_mask))

    m_p = torch.matmul(m_p.float(), path)  # prior expanded to frames: [B, C, T]
    logs_p = torch.matmul(logs_p.float(), path)

    starts = random_slices(frames, segment_frames)
    audio_hat = model.decoder(slice_frames(z, starts, segment_frames))
    audio = slice_frames(batch["audio"].unsqueeze(1), starts * HOP, segment_frames * HOP)
    return dict(audio=audio, audio_hat=audio_hat, mel=slice_frames(batch["mel"], starts, segment_frames),
                loss_dur=loss_dur, loss_kl=kl_loss(z_p.float(), logs_q.float(), m_p, logs_p, y_mask))


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


def duration_nll(dp, hidden, x_mask, durations):
    """Stochastic duration predictor NLL per item (original VITS), with the module's own submodules.

    dp: transformers' VitsStochasticDurationPredictor; hidden [B, C, L] (detached here, as in VITS);
    durations [B, 1, L] in frames. A variational bound: dequantise the durations with noise from the
    posterior flows, then score log-duration under the main flows.
    """
    x = dp.conv_proj(dp.conv_dds(dp.conv_pre(hidden.detach()), x_mask)) * x_mask
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
    mel_hat = mel_spectrogram(out["audio_hat"].squeeze(1), sampling_rate)
    return F.l1_loss(mel_hat, out["mel"].float())


# ----------------------------------------------------------------------------------------------------
# The training step: discriminator first, then generator, under autocast with fp32 losses.

def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: no CUDA GPU is visible to torch (use --device cpu)")
    if name == "cuda" and launched_processes() > 1:
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # torchrun: one GPU per process on each node
    return torch.device(name)


def resolve_precision(precision, device):
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def make_adamw(params, lr):
    """AdamW as VITS (betas 0.8/0.99, eps 1e-9), fused where the device has the kernel.

    The fused kernel updates every parameter in one pass (benchmarks/bench_train.py measures the gain);
    without it (an older torch, an unsupported device) the default loop.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr, betas=(0.8, 0.99), eps=1e-9, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr, betas=(0.8, 0.99), eps=1e-9)


@contextlib.contextmanager
def frozen(module):
    """No parameter gradients for `module` inside the block, restored even if the block raises."""
    module.requires_grad_(False)
    try:
        yield module
    finally:
        module.requires_grad_(True)


def lr_factor(step, warmup, total_steps, decay_from=None):
    """LR multiplier at `step`: linear warm-up, then cosine decay to 0 at total_steps (and 0 after it).

    decay_from=(step0, factor0): a re-planned run, whose cosine decays from factor0 at step0 instead.
    """
    if decay_from is not None and step >= decay_from[0]:
        start, peak = decay_from
    elif step < warmup:
        return step / max(1, warmup)
    else:
        start, peak = warmup, 1.0
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def add_mean(totals, terms, n):
    for key, value in terms.items():
        totals[key] = totals.get(key, 0.0) + value / n


class VitsTrainer:
    """Generator + discriminator with their optimizers, schedulers and GradScaler; one object to checkpoint."""

    def __init__(self, model, discriminator, args, device, precision):
        self.model, self.disc = model.to(device), discriminator.to(device)
        self.args, self.device, self.precision = args, device, precision
        self.sampling_rate = model.config.sampling_rate
        self.opt_g = make_adamw(self.model.parameters(), args.lr)
        self.opt_d = make_adamw(self.disc.parameters(), args.lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        if args.compile:
            # In place: the parameter names, checkpoints and exported voices stay those of eager modules.
            self.disc.compile()
            self.model.decoder.compile()
        # The passes whose gradients are averaged across torchrun's ranks; the frozen critic of the
        # generator pass leaves no gradient in itself and runs unwrapped.
        self.generator_pass = data_parallel(GeneratorPass(self.model, args.segment_frames), device)
        self.critic_pass = data_parallel(self.disc, device)
        self.schedule(1)
        self.step = 0
        self.bad_steps = 0
        self.skipped_steps = 0

    def schedule(self, total_steps, d_warmup_steps=0, decay_from=(None, None)):
        """Linear warm-up then cosine decay over the planned optimizer steps (see lr_factor).

        The generator's schedule starts after the discriminator-only steps, which leave it untouched: they
        must not use up its warm-up. decay_from: the generator's and the critic's (see replan).
        """
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = self.args.lr
                group.pop("initial_lr", None)
        g_steps = max(1, total_steps - d_warmup_steps)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, self.lr_factor(g_steps, decay_from[0]))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, self.lr_factor(total_steps, decay_from[1]))

    def lr_factor(self, total_steps, decay_from=None):
        warmup = min(self.args.warmup_steps, max(0, total_steps - 1))
        return functools.partial(lr_factor, warmup=warmup, total_steps=total_steps, decay_from=decay_from)

    def replan(self, total_steps, d_warmup_steps=0):
        """A new end for a resumed run: from here the LR decays to 0 at `total_steps` and never goes up.

        Stretching the old cosine would raise the LR; keeping it would climb back up after its end.
        During a warm-up the warm-up goes on as planned. Each scheduler counts its own steps (the
        generator's only those after the discriminator-only ones). Returns decay_from for the plan.
        """
        decay_from = []
        for sched, steps in ((self.sched_g, max(1, total_steps - d_warmup_steps)), (self.sched_d, total_steps)):
            warmup = min(self.args.warmup_steps, max(0, steps - 1))
            start = None
            if sched.last_epoch >= warmup:
                start = [sched.last_epoch, sched.get_last_lr()[0] / sched.base_lrs[0]]
            sched.lr_lambdas = [self.lr_factor(steps, start)] * len(sched.lr_lambdas)
            decay_from.append(start)
        return decay_from

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def lr(self):
        return self.sched_g.get_last_lr()[0]

    def train_window(self, batches, d_only=False):
        """One optimizer step over `batches` (gradient accumulation), in the original VITS order: the critic
        steps first, then the generator's pass runs through the updated critic. Returns the mean loss terms,
        or None for a skipped step (the critic's update, once made, stands, as in VITS).

        With one micro-batch the generator's forward serves both passes. With several, keeping every
        micro-batch's generator graph until the critic has stepped would cost the memory accumulation
        saves, so the critic's pass runs the generator without gradients and the generator's pass runs it
        again from the same RNG state: the same slices and noise, the same numbers.
        """
        self.model.train()
        self.disc.train()
        batches = [to_device(batch, self.device) for batch in batches]
        keep_graph = len(batches) == 1 and not d_only
        self.opt_d.zero_grad(set_to_none=True)
        totals, outputs, rng = {}, [], []
        for k, batch in enumerate(batches):
            rng.append(None if keep_graph else rng_state())
            with self.no_sync(self.critic_pass, k < len(batches) - 1):
                out, terms = self.critic_backward(batch, len(batches), keep_graph)
            if terms is None:
                return self.skipped()
            outputs.append(out if keep_graph else None)
            add_mean(totals, terms, len(batches))
        critic_stepped = self.update(self.opt_d, self.disc)
        if critic_stepped:
            self.sched_d.step()
        if d_only:
            return self.finish(critic_stepped, totals)

        self.opt_g.zero_grad(set_to_none=True)
        for k, batch in enumerate(batches):
            if not keep_graph:
                set_rng_state(rng[k])
                outputs[k] = self.generator_outputs(batch)
            with self.no_sync(self.generator_pass, k < len(batches) - 1):
                terms = self.generator_backward(outputs[k], len(batches))
            outputs[k] = None
            if terms is None:
                self.scaler.update()
                return self.skipped()
            add_mean(totals, terms, len(batches))
        generator_stepped = self.update(self.opt_g, self.model)
        if generator_stepped:
            self.sched_g.step()
        return self.finish(critic_stepped and generator_stepped, totals)

    def finish(self, stepped, totals):
        # fp16: finite losses with overflowing gradients are how the GradScaler finds its scale; they only
        # count towards --max_bad_steps once the scale is below 1, where overflow is no longer its search.
        searching = self.scaler.is_enabled() and self.scaler.get_scale() >= 1
        self.scaler.update()
        if not stepped:
            return self.skipped(bad=not searching)
        self.bad_steps = 0
        self.step += 1
        return totals

    def skipped(self, bad=True):
        """A step with a non-finite loss or gradient: its pending gradients dropped and counted; too many bad
        ones in a row stop the run."""
        self.opt_d.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.bad_steps += bad
        if self.bad_steps >= self.args.max_bad_steps:
            raise TrainingError(f"{self.bad_steps} non-finite training steps in a row at step {self.step}: "
                                "stopping before the model is ruined (try --precision bf16/fp32 or a lower --lr)")
        return None

    def no_sync(self, net, accumulating):
        """Under DDP, gradients are averaged once per optimizer step: not after the window's earlier micro-batches."""
        if accumulating and isinstance(net, DistributedDataParallel):
            return net.no_sync()
        return contextlib.nullcontext()

    def generator_outputs(self, batch, grad=True):
        with self.autocast(), torch.set_grad_enabled(grad):
            return self.generator_pass(batch)

    def critic_backward(self, batch, accum, keep_graph):
        """The generator's forward and the critic's loss on real and (detached) generated slices, backward.

        Returns (generator outputs, terms); terms is None when the loss is not finite on some process.
        """
        try:
            out = self.generator_outputs(batch, grad=keep_graph)
            with self.autocast():
                real_fake = torch.cat([out["audio"], out["audio_hat"].detach().to(out["audio"].dtype)])
                logits, _ = self.critic_pass(real_fake)
            half = out["audio"].size(0)
            loss_d = discriminator_loss([l[:half] for l in logits], [l[half:] for l in logits])
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as err:
            # A diverging model feeds inf/NaN to the duration spline or MAS, which raise: a bad step too,
            # agreed below like a non-finite loss (under DDP the other ranks wait in that agreement).
            message = str(err).splitlines()[0] if str(err) else ""
            tqdm.write(f"step {self.step + 1} skipped: {type(err).__name__}: {message}")
            out, loss_d = None, torch.tensor(float("nan"))
        # Under DDP every rank must run the same backward passes: a step is skipped on all or none.
        if not all_ranks(torch.isfinite(loss_d)):
            return out, None
        self.scaler.scale(loss_d / accum).backward()
        return out, dict(d=loss_d.item())

    def generator_backward(self, out, accum):
        """The generator's losses through the (updated, frozen) critic, backward. Returns the terms or None."""
        fake_logits, real_features, fake_features = self.generator_critic(out)
        loss_adv = generator_adversarial_loss(fake_logits)
        loss_fm = feature_matching_loss(real_features, fake_features)
        loss_mel = mel_slice_loss(out, self.sampling_rate)
        loss_g = (loss_adv + loss_fm + self.args.c_mel * loss_mel + self.args.c_kl * out["loss_kl"]
                  + out["loss_dur"])
        if not all_ranks(torch.isfinite(loss_g)):
            return None
        self.scaler.scale(loss_g / accum).backward()
        return dict(g=loss_g.item(), adv=loss_adv.item(), fm=loss_fm.item(), mel=loss_mel.item(),
                    kl=out["loss_kl"].item(), dur=out["loss_dur"].item())

    def generator_critic(self, out):
        """The updated critic, frozen, on the real and the generated slices: (fake logits, real features, fake
        features). The real slices need no gradient, so they run without a graph; weight norm is computed
        once for both calls."""
        with frozen(self.disc), nn.utils.parametrize.cached(), self.autocast():
            with torch.no_grad():
                _, real_features = self.disc(out["audio"])
            fake_logits, fake_features = self.disc(out["audio_hat"].to(out["audio"].dtype))
        return fake_logits, real_features, fake_features

    def update(self, opt, net):
        """Clip and step one network. False, and no update, when its gradients are not finite (with fp16
        the GradScaler skips that step itself and lowers its scale at the window's end)."""
        self.scaler.unscale_(opt)
        norm = nn.utils.clip_grad_norm_(net.parameters(), self.args.grad_clip)
        if not torch.isfinite(norm):
            opt.zero_grad(set_to_none=True)
            return False
        self.scaler.step(opt)
        return True

    @torch.no_grad()
    def evaluate(self, clipset, batch_size):
        """Validation loss terms on fixed slices (seeded), so epochs compare like with like."""
        if len(clipset) == 0:
            return {}
        self.model.eval()
        totals, count = {}, 0
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            for items in bucket_batches([clipset.frames(i) for i in range(len(clipset))], batch_size, 0):
                batch = to_device(collate([(clipset, i) for i in items], self.args.segment_frames),
                                  self.device)
                with self.autocast():
                    out = generator_forward(self.model, batch, self.args.segment_frames)
                terms = dict(mel=mel_slice_loss(out, self.sampling_rate).item(), kl=out["loss_kl"].item(),
                             dur=out["loss_dur"].item())
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + v * len(items)
                count += len(items)
        self.model.train()
        return {k: v / count for k, v in totals.items()}

    def state_dict(self):
        return dict(model=self.model.state_dict(), disc=self.disc.state_dict(), opt_g=self.opt_g.state_dict(),
                    opt_d=self.opt_d.state_dict(), sched_g=self.sched_g.state_dict(),
                    sched_d=self.sched_d.state_dict(), scaler=self.scaler.state_dict(), step=self.step,
                    skipped_steps=self.skipped_steps)

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]


# ----------------------------------------------------------------------------------------------------
# Budget, plan and throughput.

class Budget:
    """Wall-clock budget of a run, counting what earlier (resumed) parts of the run already used."""

    def __init__(self, seconds, used_before=0.0):
        self.seconds, self.used_before, self.start = seconds, used_before, time.time()

    def used(self):
        return self.used_before + time.time() - self.start

    def left(self):
        return self.seconds - self.used()


@contextlib.contextmanager
def trial_steps(trainer):
    """Training steps that leave no trace: weights, optimizer and scaler states and counters restored."""
    parts = dict(model=trainer.model, disc=trainer.disc, opt_g=trainer.opt_g, opt_d=trainer.opt_d,
                 sched_g=trainer.sched_g, sched_d=trainer.sched_d, scaler=trainer.scaler)
    snapshot = {name: copy.deepcopy(part.state_dict()) for name, part in parts.items()}
    try:
        yield trainer
    finally:
        trainer.opt_g.zero_grad(set_to_none=True)
        trainer.opt_d.zero_grad(set_to_none=True)
        for name, part in parts.items():
            part.load_state_dict(snapshot[name])
        trainer.step, trainer.bad_steps, trainer.skipped_steps = 0, 0, 0


def largest_batch(effective, try_batch, headroom=0.1):
    """Largest divisor of `effective` whose trial step fits with `headroom` of the memory to spare.

    try_batch(b) -> (peak bytes, capacity bytes) of a real step at micro-batch b; it raises
    torch.OutOfMemoryError when the step does not fit at all. Returns None if not even 1 fits.
    """
    best = None
    for b in [d for d in range(1, effective + 1) if effective % d == 0]:
        try:
            peak, capacity = try_batch(b)
        except torch.OutOfMemoryError:
            break
        if peak > (1 - headroom) * capacity:
            break
        best = b
    return best


def gpu_memory_bytes(device):
    """The GPU memory this process may use: what is free plus what its allocator already holds (the CUDA
    context, a desktop or other programs keep the rest), within set_per_process_memory_fraction's share."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(index)
    return int(min(free + torch.cuda.memory_reserved(index), total * fraction))


def choose_batch_size(trainer, clipset, args):
    """--batch_size auto -> (micro-batch, grad_accum) with AUTO_CPU_BATCH x --grad_accum clips a step."""
    resume = resume_path(args)
    if resume:
        # The run chose its batch when it started; a resumed run keeps it (see check_resumed_flags).
        saved = read_checkpoint(resume, mmap=True)["args"]
        print(f"batch size auto: {saved['batch_size']} clips x {saved['grad_accum']} accumulated, as the resumed "
              "run had")
        return saved["batch_size"], saved["grad_accum"]
    effective = AUTO_CPU_BATCH * args.grad_accum
    device = trainer.device
    # Under torchrun a trial that runs out of memory on one process would leave the others waiting in its
    # all-reduce: there auto does not search.
    if device.type != "cuda" or world_size() > 1:
        batch = AUTO_CPU_BATCH
    else:
        longest = sorted(range(len(clipset)), key=clipset.frames, reverse=True)

        def try_batch(b):
            items = [(clipset, longest[i % len(longest)]) for i in range(b)]
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            with trial_steps(trainer):
                trainer.train_window([collate(items, args.segment_frames)])
            # Reserved, not allocated: what the allocator had to hold, fragmentation included.
            return torch.cuda.max_memory_reserved(device), gpu_memory_bytes(device)
        batch = largest_batch(effective, try_batch)
        torch.cuda.empty_cache()
        if batch is None:
            raise TrainingError("--batch_size auto: not even one clip of the longest fits in GPU memory "
                                "(use a shorter --max_samples selection or --precision bf16/fp16)")
    searched = device.type == "cuda" and world_size() == 1
    print(f"batch size auto: {batch} clips x {effective // batch} accumulated = {effective} per optimizer step"
          + (" (the longest clips fit with 10% of the GPU memory to spare)" if searched else "")
          + (" (under torchrun auto does not search: give --batch_size to choose)" if world_size() > 1 else ""))
    return batch, effective // batch


def benchmark_throughput(trainer, batches, samples, d_only=False):
    """Samples/s of real training steps of one kind over `samples` samples, cycling through `batches`
    after one warm-up step; the weights are restored afterwards."""
    windows = [batches[i:i + trainer.args.grad_accum] for i in range(0, len(batches), trainer.args.grad_accum)]
    with trial_steps(trainer):
        trainer.train_window(windows[0], d_only=d_only)
        sync(trainer.device)
        done, start, count = 0, time.time(), 0
        while not any_rank(done >= samples):  # ranks' batches differ in size; all must take the same steps
            count += 1
            window = windows[count % len(windows)]
            trainer.train_window(window, d_only=d_only)
            done += sum(len(b["frames"]) for b in window)
        sync(trainer.device)
        elapsed = time.time() - start
    return done / max(elapsed, 1e-9)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_epochs(samples_per_s, n_train, n_val, seconds_left, overhead_s=10.0):
    """Whole epochs that fit the budget, counting validation (forward only, ~3x faster) and saving."""
    epoch_s = n_train / samples_per_s
    per_epoch = epoch_s + n_val / (3 * samples_per_s) + overhead_s
    return max(1, int(seconds_left // per_epoch)), epoch_s, per_epoch


def plan_run(trainer, train_sets, make_batches, n_val, args, budget, d_warmup=0):
    """Benchmark both kinds of step the run will do, then size epochs and the LR schedule; print the plan."""
    n_train = sum(len(cs) for cs in train_sets)
    batches_per_epoch = len(make_batches(1))
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    samples_per_s = d_only_per_s = None
    if args.benchmark_samples > 0:
        first = make_batches(0)
        bench = [collate(items, args.segment_frames) for items in first[:max(2, 2 * args.grad_accum)]]
        # Ranks step together, at the pace of the slowest one.
        samples_per_s = world_size() * all_reduce(benchmark_throughput(trainer, bench, args.benchmark_samples), "min")
        if d_warmup:
            # The discriminator-only warm-up steps are faster; a quarter of the samples tells by how much.
            d_only_per_s = world_size() * all_reduce(
                benchmark_throughput(trainer, bench, max(1, args.benchmark_samples // 4), d_only=True), "min")
    if args.epochs:
        epochs = args.epochs
    elif samples_per_s:
        saved_s = 0.0
        if d_only_per_s:
            saved_s = d_warmup * args.batch_size * args.grad_accum * (1 / samples_per_s - 1 / d_only_per_s)
        epochs, epoch_s, per_epoch = plan_epochs(samples_per_s, n_train, n_val, budget.left() + saved_s)
        finish = time.strftime("%H:%M", time.localtime(time.time() + epochs * per_epoch - saved_s))
        warm = f" ({d_only_per_s:.2f} in the {d_warmup} discriminator-only steps)" if d_only_per_s else ""
        print(f"plan: {samples_per_s:.2f} samples/s{warm}, {epoch_s / 60:.1f} min/epoch ({per_epoch / 60:.1f} with "
              f"validation and saving), {epochs} epochs, finishing about {finish}")
    else:
        epochs = math.ceil(args.max_steps / steps_per_epoch)
    if world_size() > 1:
        print(f"torchrun: {world_size()} processes x --batch_size {args.batch_size} x --grad_accum {args.grad_accum} "
              f"= global batch of {world_size() * args.batch_size * args.grad_accum} clips, "
              f"{steps_per_epoch} optimizer steps per epoch")
    total_steps = epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    return dict(epochs=epochs, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                samples_per_s=samples_per_s, d_only_samples_per_s=d_only_per_s)


# ----------------------------------------------------------------------------------------------------
# Saving: atomic checkpoints, listening samples, metrics.

class FileWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch reports only "unexpected pos"."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        self.f.flush()


def atomic_torch_save(obj, path):
    with written_atomically(path) as f:
        writer = FileWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error:
                raise writer.error from None
            raise


def rng_state():
    """Every RNG's state as tensors and plain Python values, so checkpoints load with weights_only=True."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                            cached_gaussian=float(cached_gaussian)))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint(path, mmap=False):
    """A checkpoint of this script, loaded with weights_only=True: tensors and plain values, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise TrainingError(f"{path}: refused, it holds pickled Python objects, not only tensors and plain values "
                            "(a checkpoint of an older version, or one that could run code)") from err
    except Exception as err:
        raise TrainingError(f"{path}: cannot read the checkpoint ({str(err).splitlines()[0]})") from err


def checkpoint_progress(path):
    """(step, epoch, batches done) a checkpoint records: how far its run had got, whatever the file dates."""
    state = read_checkpoint(path, mmap=True)  # mmap: only these few values are read from disk
    return state["trainer"]["step"], state["epoch"], state["batches_done"]


def run_checkpoints(output_dir, skip_unreadable=False):
    """The run's epoch checkpoints, oldest first by the progress they record (an unreadable one raises)."""
    progress = {}
    for path in glob.glob(os.path.join(output_dir, "checkpoints", "checkpoint_epoch_*.pt")):
        try:
            progress[path] = checkpoint_progress(path)
        except TrainingError:
            if not skip_unreadable:
                raise
    return sorted(progress, key=progress.get)


def newest_checkpoint(output_dir):
    paths = run_checkpoints(output_dir)
    return paths[-1] if paths else None


def prune_checkpoints(output_dir, keep):
    # A file that is not a readable checkpoint is not ours to judge: it is left alone.
    for path in run_checkpoints(output_dir, skip_unreadable=True)[:-keep]:
        os.remove(path)


def write_wav(path, audio, sampling_rate):
    tmp = temp_name(path)
    sf.write(tmp, audio, sampling_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


@torch.no_grad()
def synthesise(model, tokenizer, sentences, out_dir, seed=0, max_seconds=SAMPLE_MAX_SECONDS):
    """Speak each sentence to out_dir/NN.wav with fixed noise, so epochs can be compared by ear."""
    os.makedirs(out_dir, exist_ok=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    paths = []
    cap = model.duration_predictor.register_forward_hook(
        cap_durations(int(max_seconds * model.config.sampling_rate / HOP)))
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i, sentence in enumerate(sentences):
                ids = torch.tensor([token_ids(tokenizer, sentence)], device=device)
                audio = model(input_ids=ids).waveform[0].float().cpu().numpy()
                paths.append(os.path.join(out_dir, f"{i:02d}.wav"))
                write_wav(paths[-1], audio, model.config.sampling_rate)
    finally:
        cap.remove()
    model.train(was_training)
    return paths


def cap_durations(max_frames):
    """Forward hook on the duration predictor at inference: at most `max_frames` frames per sentence.

    A diverging model can predict hours of audio for one sentence (or NaN durations), and decoding them
    takes gigabytes and minutes; the listening sample of such a model is worthless anyway.
    """
    def hook(module, inputs, log_duration):
        log_duration = torch.nan_to_num(log_duration, nan=0.0, posinf=math.log(max_frames), neginf=0.0)
        excess = torch.logsumexp(log_duration.flatten(1), dim=1) - math.log(max_frames)
        return log_duration - excess.clamp(min=0)[:, None, None]
    return hook


def read_sentences(path):
    if path is None:
        return DEFAULT_SENTENCES
    with open(path, encoding="utf-8") as f:
        sentences = [line.strip() for line in f if line.strip()]
    if not sentences:
        raise TrainingError(f"--sample_sentences {path}: no sentences in the file")
    return sentences


# ----------------------------------------------------------------------------------------------------
# Voice quality: held-out clips spoken from their text alone, compared with their recordings.
#
# MCD-DTW (mel-cepstral distortion after dynamic time warping), in dB. Both clips lose their silent
# edges as prepare_data.py trims them, then are described by the training features: 80-band log-mel
# (natural log of the magnitude; n_fft 1024, Hann window 1024 = 64 ms, hop 256 = 16 ms at 16 kHz). A
# DCT-II over the 80 bands gives each frame a mel-cepstrum, scaled as SPTK's mel-cepstra are defined:
# log-mel[k] = c0 + sum_m c_m cos(pi m (k + 1/2) / 80). c0 (loudness) is left out, c1..c24 kept, and
#     MCD(x, y) = 10 / ln 10 * sqrt(2 * sum_{m=1..24} (c_m(x) - c_m(y))^2),
# the RMS difference in dB of the two cepstrally smoothed mel spectra. librosa.sequence.dtw pairs the
# frames (steps (1,1), (1,0), (0,1), equal weights, no band) minimising the summed MCD; MCD-DTW is the
# mean MCD over the pairs of that path. Mel filters rather than SPTK's all-pass warping, and 16 ms
# rather than 5 ms frames: compare these numbers with each other, not with papers.

MCD_ORDER = 24
MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)
# An untrained duration predictor can ask for minutes of audio: a spoken clip is cut at this many times
# its recording's length, which also caps the duration ratio.
MAX_DURATION_RATIO = 4.0


def trim_edges(audio):
    """Silent edges cut as prepare_data.py cuts them; never shorter than one STFT window."""
    trimmed = trim_silence(audio)
    audio = trimmed if len(trimmed) >= N_FFT else audio
    return np.pad(audio, (0, max(0, N_FFT - len(audio))))


def mel_cepstrum(audio, sampling_rate):
    """[frames, 24]: c1..c24 of the mel-cepstrum of each frame of the training log-mel."""
    log_mel = mel_spectrogram(torch.from_numpy(np.asarray(audio, dtype=np.float32))[None], sampling_rate)[0]
    cepstrum = dct(log_mel.numpy().astype(np.float64), type=2, norm="ortho", axis=0) * math.sqrt(2.0 / N_MELS)
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
def speak_ids(model, ids, max_frames, seed):
    """Waveform of token ids by the inference path (duration predictor, flow reversed, decoder), fixed
    noise; durations are scaled down together when they ask for more than max_frames frames."""

    def cap(module, inputs, log_duration):
        frames = torch.exp(log_duration).sum() / model.speaking_rate
        return log_duration - torch.log(torch.clamp(frames / max_frames, min=1.0))

    device = next(model.parameters()).device
    handle = model.duration_predictor.register_forward_hook(cap)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            waveform = model(input_ids=torch.as_tensor(ids, device=device)[None]).waveform[0]
    finally:
        handle.remove()
    return waveform.float().cpu().numpy()


def evaluate_quality(model, clipset, n_clips):
    """Mean MCD-DTW, duration ratio (mean and spread) and DNSMOS of the first n_clips held-out clips,
    each spoken from its token ids alone with the same noise every epoch."""
    was_training = model.training
    model.eval()
    sampling_rate = model.config.sampling_rate
    mcds, ratios, scores = [], [], []
    for i in range(min(n_clips, len(clipset))):
        real = clipset.audio[i].astype(np.float32) / 32768.0
        synth = speak_ids(model, clipset.tokens[i], MAX_DURATION_RATIO * len(real) / HOP, seed=i)
        mcd, ratio = compare_to_recording(synth, real, sampling_rate)
        mcds.append(mcd)
        ratios.append(ratio)
        scores.append(dnsmos_scores(synth, sampling_rate))
    model.train(was_training)
    if not mcds:
        return {}
    return dict(mcd=float(np.mean(mcds)), dur_ratio=float(np.mean(ratios)), dur_ratio_std=float(np.std(ratios)),
                **{k: float(np.mean([s[k] for s in scores])) for k in scores[0]})


def quality_prefix(set_name):
    """eval_mcd, ... for train_vits.py's validation set; feedback_eval_mcd, ... for train_feedback.py's."""
    return "eval" if set_name == "val" else f"{set_name}_eval"


def selection_score(record, set_name, metric):
    """What checkpoints/best_model/ minimises (--best_metric): validation mel, MCD, or minus DNSMOS OVRL."""
    if metric == "val_mel":
        return record[f"{set_name}_mel"]
    if metric == "mcd":
        return record[f"{quality_prefix(set_name)}_mcd"]
    return -record[f"{quality_prefix(set_name)}_dnsmos_ovrl"]


@functools.lru_cache(maxsize=1)
def load_asr(name_or_dir):
    """A CTC recogniser and its processor (e.g. MMS ASR saved with its Kurmanji adapter), on the CPU."""
    try:
        processor = AutoProcessor.from_pretrained(name_or_dir)
        model = AutoModelForCTC.from_pretrained(name_or_dir).eval()
    except OSError as err:
        raise TrainingError(f"--asr_model {name_or_dir}: cannot load a CTC model and processor ({err})") from err
    return processor, model


@torch.no_grad()
def transcribe(paths, asr_model):
    processor, model = load_asr(asr_model)
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


class MetricsLog:
    """metrics.jsonl lines, plus TensorBoard scalars and audio when tensorboard is installed."""

    def __init__(self, output_dir):
        self.path, self.tb = os.path.join(output_dir, "metrics.jsonl"), None
        if not is_main_process():
            self.path = None  # under torchrun only rank 0 logs
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record):
        if self.path is None:
            return
        # One write call per line, so a killed run never leaves half a record.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(key, value, record["step"])

    def audio(self, tag, paths, step):
        if self.tb:
            for path in paths:
                audio, sr = sf.read(path, dtype="float32")
                self.tb.add_audio(f"{tag}/{os.path.basename(path)}", audio, step, sample_rate=sr)

    def close(self):
        if self.tb:
            self.tb.close()


def format_terms(terms):
    return " | ".join(f"{k} {v:.3g}" for k, v in terms.items())


# ----------------------------------------------------------------------------------------------------
# The loop, shared with train_feedback.py.

class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to save a resumable checkpoint and exit; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        # Windows has no SIGTERM from other processes; Ctrl-C is SIGINT everywhere, Ctrl-Break SIGBREAK.
        for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
            if hasattr(signal, name):
                sig = getattr(signal, name)
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a resumable checkpoint, then exiting", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def vram_text(device):
    if device.type != "cuda":
        return ""
    return f"{torch.cuda.memory_allocated(device) / 2**30:.1f}/{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"


def fit(trainer, tokenizer, train_sets, make_batches, val_sets, args, budget, run, data_key):
    """Train epoch by epoch inside the budget; checkpoint every epoch; keep best and final models.

    make_batches(epoch) -> list of micro-batches, each a list of (clipset, index) items; it must be
    deterministic for a given epoch so a resumed run continues with the same order.
    run: dict(plan=..., epoch=..., batches_done=..., best=...) from plan_run or a checkpoint.
    Returns "done", "deadline", "max_steps" or "interrupted".
    """
    output_dir = args.output_dir
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    for folder in (output_dir, ckpt_dir):
        remove_stale_temps(folder)  # left by a run killed while saving
    log = MetricsLog(output_dir)
    sentences = read_sentences(args.sample_sentences)
    if args.asr_model and is_main_process():  # only rank 0 runs the end-of-epoch work
        load_asr(args.asr_model)  # a wrong name fails now, not after the first epoch
    plan = run["plan"]
    d_warmup = run["d_warmup_steps"]
    save_seconds = [5.0]
    end_of_epoch_seconds = 0.0  # validation + listening samples, as last measured
    reason = "done"

    def checkpoint(epoch, batches_done, tag=""):
        start = time.time()
        rank_rngs = gather_objects(rng_state())  # each rank draws its own slices: resume restores each
        if not is_main_process():
            return
        state = dict(trainer=trainer.state_dict(), epoch=epoch, batches_done=batches_done, plan=plan,
                     budget_used=budget.used(), best=run["best"], d_warmup_steps=d_warmup, rng=rank_rngs[0],
                     args=vars(args), data_key=data_key, model_config=trainer.model.config.to_dict(),
                     world_size=world_size())
        if world_size() > 1:
            state["rank_rngs"] = rank_rngs
        atomic_torch_save(state, os.path.join(ckpt_dir, f"checkpoint_epoch_{epoch}{tag}.pt"))
        prune_checkpoints(output_dir, args.keep_checkpoints)
        save_seconds.append(time.time() - start)

    def reserve():
        # Time kept back at the deadline for the last checkpoint and the final model.
        return 2.5 * max(save_seconds) + 2.0

    with StopRequest() as stop:
        for epoch in range(run["epoch"], plan["epochs"] + 1):
            batches = make_batches(epoch)
            skip = run["batches_done"] if epoch == run["epoch"] else 0
            windows = [batches[i:i + args.grad_accum] for i in range(skip, len(batches), args.grad_accum)]
            bar = tqdm(total=len(batches), initial=skip, desc=f"epoch {epoch}/{plan['epochs']}", unit="batch",
                       disable=not is_main_process())
            done, samples, start, terms, interrupted = skip, 0, time.time(), {}, False
            for window in windows:
                # Agreed by all ranks, so they stop at the same step (a signal may reach only one).
                interrupted = any_rank(stop.requested)
                out_of_time = any_rank(budget.left() < reserve())
                if interrupted or out_of_time or (args.max_steps and trainer.step >= args.max_steps):
                    break
                tensors = [collate(items, args.segment_frames) for items in window]
                result = trainer.train_window(tensors, d_only=trainer.step < d_warmup)
                terms = result or terms  # a skipped (non-finite) step keeps showing the last good terms
                done += len(window)
                samples += sum(len(items) for items in window) * world_size()  # every rank trains as many
                rate = samples / (time.time() - start)
                epoch_eta = (len(batches) - done) * (time.time() - start) / max(1, done - skip)
                bar.set_postfix_str(f"{format_terms(terms)} | {rate:.1f} samples/s {vram_text(trainer.device)} "
                                    f"| eta {epoch_eta / 60:.0f}m, total {budget.left() / 60:.0f}m left")
                bar.update(len(window))
                if result and trainer.step % args.logging_steps == 0:
                    log.write(dict(step=trainer.step, epoch=epoch, **terms, lr=trainer.lr(), samples_per_s=rate,
                                   skipped_steps=trainer.skipped_steps))
            bar.close()
            if done < len(batches):
                if interrupted:
                    checkpoint(epoch, done, "_interrupted")
                    reason = "interrupted"
                    break
                reason = "max_steps" if args.max_steps and trainer.step >= args.max_steps else "deadline"
                checkpoint(epoch, done, "_partial")
                break
            run.update(epoch=epoch + 1, batches_done=0)
            train_seconds = time.time() - start
            if is_main_process() and budget.left() > reserve() + end_of_epoch_seconds:
                end_of_epoch(trainer, tokenizer, val_sets, sentences, epoch, args, run, log)
                end_of_epoch_seconds = time.time() - start - train_seconds
            barrier()  # the other ranks wait for rank 0's validation and samples
            print(f"epoch {epoch}: {len(batches) - skip} batches in {train_seconds / 60:.1f} min, "
                  f"step {trainer.step}, {trainer.skipped_steps} non-finite steps skipped so far")
            checkpoint(epoch, len(batches))
            if args.max_steps and trainer.step >= args.max_steps:
                reason = "max_steps"
                break
    if reason != "interrupted" and is_main_process():
        export_voice(trainer.model, tokenizer, trainer.disc, os.path.join(output_dir, "final_model"))
        print(f"final model: {os.path.join(output_dir, 'final_model')} ({reason}, step {trainer.step}, "
              f"{budget.used() / 3600:.2f} h used)")
    log.close()
    # torchrun stops every process once one exits with an error code (130 after Ctrl-C): none leaves
    # before rank 0 has saved.
    barrier()
    return reason


def end_of_epoch(trainer, tokenizer, val_sets, sentences, epoch, args, run, log):
    """Validation, voice quality, listening samples (transcribed with --asr_model), best model."""
    scores = {name: trainer.evaluate(cs, args.batch_size) for name, cs in val_sets.items() if len(cs)}
    record = dict(step=trainer.step, epoch=epoch)
    for name, terms in scores.items():
        record.update({f"{name}_{k}": v for k, v in terms.items()})
        if args.eval_clips:
            quality = evaluate_quality(trainer.model, val_sets[name], args.eval_clips)
            record.update({f"{quality_prefix(name)}_{k}": v for k, v in quality.items()})
    paths = synthesise(trainer.model, tokenizer, sentences, os.path.join(args.output_dir, "samples", f"epoch_{epoch}"))
    log.audio(f"epoch_{epoch}", paths, trainer.step)
    if args.asr_model:
        record["asr_cer"] = character_error_rate(sentences, transcribe(paths, args.asr_model))
    if len(record) > 2:
        log.write(record)
        print(f"epoch {epoch} validation: {format_terms({k: v for k, v in record.items() if '_' in k})}")
    if scores:
        main_score = selection_score(record, next(iter(scores)), args.best_metric)
        if run["best"] is None or main_score < run["best"]:
            run["best"] = main_score
            export_voice(trainer.model, tokenizer, trainer.disc,
                         os.path.join(args.output_dir, "checkpoints", "best_model"))


def load_checkpoint(path, trainer, data_key):
    """Restore a run exactly; a checkpoint of another model or data set fails loudly."""
    state = read_checkpoint(path)
    check_resumed_flags(state.get("args", {}), trainer.args, path)
    if state.get("data_key") != data_key:
        raise TrainingError(f"--resume {path}: the checkpoint was trained on other data "
                            "(metadata.csv or the validation split changed); start a new --output_dir")
    saved_world = state.get("world_size", 1)
    if saved_world != world_size():
        # Each rank's place in the epoch and its random state belong to the number of processes.
        raise TrainingError(f"--resume {path}: the run was trained by {saved_world} process(es), this one has "
                            f"{world_size()}; resume it with torchrun --nproc_per_node {saved_world}"
                            + (" (or plain python)" if saved_world == 1 else ""))
    try:
        trainer.schedule(state["plan"]["total_steps"], state["d_warmup_steps"],
                         state["plan"].get("decay_from", (None, None)))
        trainer.load_state_dict(state["trainer"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise TrainingError(f"--resume {path}: the checkpoint does not match --model "
                            f"({str(err).splitlines()[0]})") from err
    set_rng_state(state["rank_rngs"][rank()] if world_size() > 1 else state["rng"])
    return state


# Flags that shape the LR schedule or which clips make up each batch: a resumed run must keep them.
RESUME_FIXED = ("lr", "batch_size", "grad_accum", "seed", "replay_ratio", "feedback_weight")


def check_resumed_flags(saved, args, path):
    changed = [f"--{name} {getattr(args, name)} (the run has {saved[name]})" for name in RESUME_FIXED
               if name in saved and hasattr(args, name) and saved[name] != getattr(args, name)]
    if changed:
        raise TrainingError(f"--resume {path}: {', '.join(changed)}; a resumed run keeps its LR schedule and the "
                            "clips of every batch: give the run's values, or start over with --overwrite")


def data_fingerprint(train_sets, val_sets):
    """What the run trains on: names, texts and audio (a WAV replaced under the same name changes it)."""
    h = hashlib.sha256()
    for cs in list(train_sets) + list(val_sets.values()):
        for name, text, pcm in zip(cs.names, cs.texts, cs.audio):
            h.update(f"{name}|{text}|{len(pcm)}|{zlib.crc32(np.ascontiguousarray(pcm))}\n".encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def epoch_batches(clipset, batch_size, seed):
    """make_batches for one clip set: bucketed batches, a new shuffle each epoch."""
    lengths = [clipset.frames(i) for i in range(len(clipset))]

    def make(epoch):
        return [[(clipset, i) for i in b] for b in bucket_batches(lengths, batch_size, seed * 1000 + epoch)]
    return make


def resume_path(args):
    """The checkpoint --resume names (auto: the newest in --output_dir), or None for a fresh run."""
    if args.resume != "auto":
        return args.resume
    path = newest_checkpoint(args.output_dir)
    if path is None:
        raise TrainingError(f"--resume auto: no checkpoint in {os.path.join(args.output_dir, 'checkpoints')}")
    return path


def start_run(trainer, train_sets, make_batches, val_sets, args, budget, default_d_warmup):
    """A fresh run (benchmark + plan) or the state of the checkpoint named by --resume."""
    data_key = data_fingerprint(train_sets, val_sets)
    longest = max(cs.frames(i) for cs in train_sets for i in range(len(cs)))
    if args.segment_frames > longest:
        raise TrainingError(f"--segment_frames {args.segment_frames} is longer than the longest training clip "
                            f"({longest} frames): every slice would be padding; use at most {longest}")
    resume = resume_path(args)
    if resume:
        state = load_checkpoint(resume, trainer, data_key)
        budget.used_before = state["budget_used"]
        print(f"resumed {resume}: epoch {state['epoch']}, step {trainer.step}, "
              f"{budget.left() / 3600:.2f} h of budget left")
        if args.epochs and args.epochs != state["plan"]["epochs"]:
            resize_plan(trainer, state["plan"], args.epochs, args.max_steps, state["d_warmup_steps"])
        run = dict(plan=state["plan"], epoch=state["epoch"], batches_done=state["batches_done"], best=state["best"],
                   d_warmup_steps=state["d_warmup_steps"])
        if state["batches_done"] >= len(make_batches(state["epoch"])):
            run.update(epoch=state["epoch"] + 1, batches_done=0)
        return run, data_key
    n_val = sum(len(cs) for cs in val_sets.values())
    d_warmup = default_d_warmup if args.d_warmup_steps is None else args.d_warmup_steps
    plan = plan_run(trainer, train_sets, make_batches, n_val, args, budget, d_warmup)
    trainer.schedule(plan["total_steps"], d_warmup)
    return dict(plan=plan, epoch=1, batches_done=0, best=None, d_warmup_steps=d_warmup), data_key


def resize_plan(trainer, plan, epochs, max_steps, d_warmup_steps=0):
    """--epochs changed on resume: the schedule ends at the new last step, from the LR it has now."""
    total_steps = epochs * plan["steps_per_epoch"]
    if max_steps:
        total_steps = min(total_steps, max_steps)
    plan.update(epochs=epochs, total_steps=total_steps, decay_from=trainer.replan(total_steps, d_warmup_steps))
    print(f"plan: {epochs} epochs, {total_steps} steps; the learning rate decays from {trainer.lr():.2e} "
          f"at step {trainer.step}")


# What a run leaves in its output_dir; the first three mean a run was started there.
RUN_MARKERS = ("run_config.json", "checkpoints", "final_model")
RUN_OUTPUTS = RUN_MARKERS + ("samples", "metrics.jsonl", "tensorboard", "report.json")


def claim_output_dir(args, script):
    """Lock args.output_dir for this run. A fresh run refuses a folder holding an earlier run unless
    --overwrite (which deletes that run's outputs, never the data or the cache); nothing ever writes into
    another script's run. Under torchrun only rank 0 claims it, for the whole run (None elsewhere)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = OutputLock(args.output_dir)
    try:
        lock.acquire()
    except FolderInUse as err:
        raise TrainingError(str(err)) from None
    found = [name for name in RUN_MARKERS if os.path.isfile(os.path.join(args.output_dir, name))
             or os.path.isdir(os.path.join(args.output_dir, name)) and os.listdir(os.path.join(args.output_dir, name))]
    owner = run_script(args.output_dir)
    if owner not in (None, script):
        lock.release()
        raise TrainingError(f"--output_dir {args.output_dir} holds a {owner}.py run; {script}.py never writes into "
                            "it: choose another folder")
    if found and not args.resume:
        if not args.overwrite:
            lock.release()
            raise TrainingError(f"--output_dir {args.output_dir} already holds a run ({', '.join(found)}): continue "
                                "it with --resume auto, start it over with --overwrite, or choose another folder")
        for name in RUN_OUTPUTS:
            path = os.path.join(args.output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        print(f"--overwrite: deleted the earlier run in {args.output_dir} ({', '.join(found)})")
    return lock


def run_script(output_dir):
    """Which script's run `output_dir` holds, from its run_config.json (None when there is none)."""
    try:
        with open(os.path.join(output_dir, "run_config.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    # Runs from before `script` was recorded: only feedback runs have --feedback_dir.
    return info.get("script") or ("train_feedback" if "feedback_dir" in info.get("args", {}) else "train_vits")


def report_fatal(err, output_dir):
    """One line on stderr for what ended a run early, and the exit code: 130 for Ctrl-C, else 2."""
    if isinstance(err, KeyboardInterrupt):  # before training (preload, benchmark) or a second one during it
        print("error: interrupted; checkpoints already saved are kept (--resume auto continues)", file=sys.stderr)
        return 130
    if isinstance(err, OSError):  # e.g. a full disk while saving: one line, not a chain of tracebacks
        print(f"error: {err.filename or output_dir}: {err.strerror or err}", file=sys.stderr)
    else:
        print(f"error: {err}", file=sys.stderr)
    return 2


def save_run_info(args, extra):
    os.makedirs(args.output_dir, exist_ok=True)
    if not is_main_process():
        return
    info = dict(args=vars(args), argv=sys.argv, torch=torch.__version__, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                processes=world_size(), **extra)
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                     cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    with open(os.path.join(args.output_dir, "run_config.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, default=str)


def main(argv=None):
    args = parse_args(argv)
    budget = Budget(args.target_hours * 3600)
    lock = None
    try:
        lock = claim_output_dir(args, "train_vits")
        # 1. Machine and precision.
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        init_distributed(device)
        # 2. The pretrained voice and its critic.
        model, tokenizer = load_voice(args.model)
        prepare_for_training(model)
        disc = load_discriminator(args.discriminator) if args.discriminator else VitsDiscriminator(max_channels=args.disc_channels)
        sr = model.config.sampling_rate
        print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {sr} Hz; "
              f"device {device}, precision {precision}")
        # 3. Data, preloaded into RAM.
        clips, errors = load_clips(args.data_dir, sr, os.path.join(args.output_dir, "cache"), args.num_workers,
                                   args.max_samples)
        clipset = ClipSet(clips, tokenizer)
        for reason, count in clipset.dropped.items():
            print(f"dropped {count} clips: {reason}")
        train_set, val_set = split_validation(clipset, args.val_size)
        if len(train_set) == 0:
            raise TrainingError(f"{args.data_dir}: no usable clips ({len(errors)} failed to load)")
        print(f"data: {len(train_set)} training clips, {len(val_set)} validation clips, "
              f"{len(errors)} skipped as unreadable")
        save_run_info(args, dict(script="train_vits", precision=precision, device=str(device),
                                 train_clips=len(train_set), val_clips=len(val_set), skipped_clips=errors,
                                 dropped_clips=clipset.dropped))
        # 4. Plan (or resume), then train.
        trainer = VitsTrainer(model, disc, args, device, precision)
        if args.batch_size == "auto":
            args.batch_size, args.grad_accum = choose_batch_size(trainer, train_set, args)
        make_batches = shard_batches(epoch_batches(train_set, args.batch_size, args.seed))
        val_sets = {"val": val_set}
        run, data_key = start_run(trainer, [train_set], make_batches, val_sets, args, budget,
                                  default_d_warmup=0 if args.discriminator else 200)
        reason = fit(trainer, tokenizer, [train_set], make_batches, val_sets, args, budget, run, data_key)
    except (TrainingError, OSError, KeyboardInterrupt) as err:
        return report_fatal(err, args.output_dir)
    finally:
        if lock:
            lock.release()
        leave_distributed()
    return 130 if reason == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
