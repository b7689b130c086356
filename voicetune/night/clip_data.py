"""A clip's way from metadata.csv to a training batch: every clip decoded once and held in RAM as int16
audio + fp16 log-mel (cached on disk), ClipSet (clips with token ids), the validation split, length
buckets, each epoch's batches, and collate into padded tensors."""

import copy
import glob
import hashlib
import json
import os
import random
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import psutil
import soundfile as sf
import torch
from tqdm.auto import tqdm

from voicetune.common import distributed
from voicetune.common import run_errors
from voicetune.common import run_folder
from voicetune.common import speech
from voicetune.night import training_flags
from voicetune.voice import spectrogram

CACHE_VERSION = 1


def read_clip(job):
    """Worker: decode one clip at the model's rate (trimmed of its silent edges with `trim`, as prepare_data.py
    trims) and compute its log-mel. Never raises: a clip it cannot use comes back with a message and the
    reason it is counted under."""
    index, path, sampling_rate, trim = job
    try:
        audio = speech.load_audio(path, sampling_rate)
        pcm = speech.to_int16(audio)
        if trim:
            audio = speech.trim_silence(pcm.astype(np.float32) / 32768.0)
            if speech.is_silent(audio):
                raise speech.AudioError("nothing louder than -50 dBFS", "silent")
            if len(audio) < spectrogram.HOP:
                raise speech.AudioError(f"{len(audio)} samples after trimming", "too_short")
            pcm = speech.to_int16(audio)  # exact: audio came from int16 / 32768
        if len(pcm) < spectrogram.HOP:
            raise speech.AudioError("shorter than one spectrogram frame", "too_short")
        mel = spectrogram.mel_spectrogram(torch.from_numpy(pcm.astype(np.float32) / 32768.0)[None], sampling_rate)[0]
        return index, pcm, mel.numpy().astype(np.float16), None, None
    except speech.AudioError as err:
        return index, None, None, f"{os.path.basename(path)}: {err}", err.reason
    except (OSError, RuntimeError, ValueError) as err:
        return index, None, None, f"{os.path.basename(path)}: {err}", "decode_error"


def _init_worker(parent_pid, parent_started):
    torch.set_num_threads(1)
    run_folder.exit_with_parent(parent_pid, parent_started)


def cache_key(audio_dir, entries, sampling_rate, trim=False):
    """Hash of everything that shapes the preloaded arrays: files, sizes, mtimes, spectrogram settings, trimming."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, spectrogram.SPEC_SETTINGS, sampling_rate]
                                  + (["trimmed"] if trim else [])).encode())
    for name, _ in entries:
        path = os.path.join(audio_dir, name)
        try:
            st = os.stat(path)
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}|missing\n".encode())
    return h.hexdigest()[:16]


def cache_path(cache_dir, audio_dir, entries, sampling_rate, trim=False):
    """The preload cache file of these clips in `cache_dir`."""
    return os.path.join(cache_dir, f"preload_{cache_key(audio_dir, entries, sampling_rate, trim)}.npz")


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
    return samples * 2 + (samples // spectrogram.HOP) * spectrogram.N_MELS * 2


def decode_all(audio_dir, entries, sampling_rate, num_workers, trim=False):
    """(audio, mels, error messages, [(clip, reason)] of the clips that failed, in the messages' order)."""
    jobs = [(i, os.path.join(audio_dir, name), sampling_rate, trim) for i, (name, _) in enumerate(entries)]
    audio, mels, errors, failed = [None] * len(jobs), [None] * len(jobs), [], []
    parent = run_folder.worker_setup()["initargs"]
    with ProcessPoolExecutor(max_workers=max(1, num_workers), initializer=_init_worker, initargs=parent) as pool:
        results = pool.map(read_clip, jobs, chunksize=16)
        for index, pcm, mel, err, reason in tqdm(results, total=len(jobs), desc="preload", unit="clip"):
            audio[index], mels[index] = pcm, mel
            if err:
                errors.append(err)
                failed.append((entries[index][0], reason))
    return audio, mels, errors, failed


def save_cache(path, names, audio, mels, errors, failed):
    """One uncompressed npz that np.load reads back, written clip by clip.

    Concatenating first would hold a second copy of every clip: twice the RAM the trainer keeps (7 GB
    instead of 3.5 GB at 23 h of audio, benchmarks/bench_preload.py).
    """
    kept = [i for i, a in enumerate(audio) if a is not None]
    small = dict(names=np.array([names[i] for i in kept]), errors=np.array(errors, dtype=str),
                 failed=np.array([n for n, _ in failed], dtype=str),
                 reasons=np.array([r for _, r in failed], dtype=str),
                 audio_len=np.array([len(audio[i]) for i in kept], dtype=np.int64),
                 mel_len=np.array([mels[i].shape[1] for i in kept], dtype=np.int64))
    big = dict(audio=(np.int16, (int(small["audio_len"].sum()),), lambda i: audio[i]),
               mel=(np.float16, (int(small["mel_len"].sum()), spectrogram.N_MELS), lambda i: mels[i].T))
    # The zip directory is written as the ZipFile closes, before the file reaches the disk and is renamed.
    with run_folder.written_atomically(path) as raw, \
            zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
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
    """The cached clips, errors and [(clip, reason)] of the failed ones, or None when the file is damaged (a
    copy cut short, a failing disk). A cache written before reasons were kept has none."""
    try:
        with np.load(path) as z:
            names, errors = list(z["names"]), list(z["errors"])
            failed = list(zip(map(str, z["failed"]), map(str, z["reasons"]))) if "reasons" in z.files else []
            audio = np.split(z["audio"], np.cumsum(z["audio_len"])[:-1])
            mels = [m.T for m in np.split(z["mel"], np.cumsum(z["mel_len"])[:-1])]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        print(f"preload: cache {path} is unreadable ({err}): rebuilding it")
        return None
    return {str(n): (a, m) for n, a, m in zip(names, audio, mels)}, [str(e) for e in errors], failed


def load_clips(data_dir, sampling_rate, cache_dir, num_workers, max_samples=None, audio_subdir="wavs", entries=None,
               trim=False, skipped=None):
    """Clips of `data_dir/metadata.csv` as [(name, text, int16 audio, fp16 mel)], plus skipped-clip messages.

    Audio files are looked up in `data_dir/audio_subdir`, in any format soundfile reads, at any rate.
    `entries` [(file, text)] replaces metadata.csv (a feedback folder of NAME.wav + NAME.txt pairs has none).
    trim: cut each clip's silent edges while decoding (recordings not made by prepare_data.py).
    skipped: a list that receives {"file", "reason", "detail"} of every clip that failed to load, under
    prepare_data.py's reason names.
    """
    metadata = os.path.join(data_dir, "metadata.csv")
    audio_dir = os.path.join(data_dir, audio_subdir)
    if entries is None:
        if not os.path.isfile(metadata):
            raise run_errors.TrainingError(f"{metadata}: not found (run prepare_data.py first, or pass --data_dir)")
        left_out = Counter()
        try:
            entries = speech.read_metadata(metadata, left_out)
        except speech.MetadataError as err:
            raise run_errors.TrainingError(str(err)) from None
        if left_out:
            print(f"{metadata}: rows left out: {', '.join(f'{n} {reason}' for reason, n in left_out.items())}")
    if max_samples:
        entries = entries[:max_samples]
    if not entries:
        raise run_errors.TrainingError(f"{metadata}: no clips listed")
    os.makedirs(cache_dir, exist_ok=True)
    cache = cache_path(cache_dir, audio_dir, entries, sampling_rate, trim)
    # Under torchrun rank 0 decodes and writes the cache; the other ranks then read it.
    with distributed.main_process_first():
        run_folder.remove_stale_temps(cache_dir)
        cached = load_cache(cache) if os.path.isfile(cache) else None
        if cached:
            clips, errors, failed = cached
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
                raise run_errors.TrainingError(f"preload needs about {need / 2**30:.1f} GiB but only "
                                               f"{free / 2**30:.1f} GiB is available: use --max_samples or a machine "
                                               "with more RAM")
            names = [name for name, _ in entries]
            audio, mels, errors, failed = decode_all(audio_dir, entries, sampling_rate, num_workers, trim)
            save_cache(cache, names, audio, mels, errors, failed)
            clips = {n: (a, m) for n, a, m in zip(names, audio, mels) if a is not None}
    for err in errors:
        print(f"skipped clip {err}")
    if skipped is not None:
        skipped.extend(dict(file=name, reason=reason, detail=err.split(": ", 1)[-1])
                       for (name, reason), err in zip(failed, errors))
    texts = dict(entries)
    return [(name, texts[name], a, m) for name, (a, m) in clips.items() if name in texts], errors


# Why ClipSet leaves a clip out, by the reason names prepare_data.py counts under, and the words train_vits.py
# prints. The monotonic alignment needs at least one frame per token.
DROP_REASONS = {"empty_text": "no speakable text", "too_few_frames": "more tokens than frames"}


def drop_reason(n_ids, n_frames):
    """The DROP_REASONS key of a clip of `n_ids` token ids and `n_frames` mel frames, or None to keep it."""
    if n_ids <= 1:
        return "empty_text"
    if n_ids > n_frames:
        return "too_few_frames"
    return None


class ClipSet:
    """Preloaded clips with token ids; items drop_reason refuses are left out and counted.

    dropped: {words: count} of DROP_REASONS; dropped_clips: [{"file", "reason", "detail"}] of each.
    speaker_ids: each clip's speaker in a multi-speaker voice (speakers.choose_speakers), else None.
    """

    def __init__(self, clips, tokenizer):
        self.names, self.texts, self.audio, self.mels, self.tokens = [], [], [], [], []
        self.speaker_ids = None
        self.dropped, self.dropped_clips = {}, []
        for name, text, pcm, mel in clips:
            ids = speech.token_ids(tokenizer, text)
            reason = drop_reason(len(ids), mel.shape[1])
            if reason:
                words = DROP_REASONS[reason]
                self.dropped[words] = self.dropped.get(words, 0) + 1
                self.dropped_clips.append(dict(file=name, reason=reason,
                                               detail=f"{len(ids)} token ids, {mel.shape[1]} frames"))
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
        for attr in ("names", "texts", "audio", "mels", "tokens") + (("speaker_ids",) if self.speaker_ids else ()):
            setattr(other, attr, [getattr(self, attr)[i] for i in indices])
        return other

    def with_speaker(self, speaker_id):
        """A copy whose every clip is speaker `speaker_id` (a feedback folder: one listener's voice)."""
        other = copy.copy(self)
        other.speaker_ids = None if speaker_id is None else [speaker_id] * len(self)
        return other


def held_out_indices(names, val_size, at_least_one=False):
    """Which of the clips `names` are held out, in order: as many as training_flags.held_out_count says,
    chosen by a hash of their names, so the split is the same on every run and resume."""
    count = training_flags.held_out_count(len(names), val_size, at_least_one)
    return sorted(sorted(range(len(names)), key=lambda i: hashlib.sha1(names[i].encode()).hexdigest())[:count])


def split_validation(clips, val_size, at_least_one=False):
    """(train, held-out) ClipSets, as held_out_indices splits them."""
    val = held_out_indices(clips.names, val_size, at_least_one)
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


def epoch_batches(clipset, batch_size, seed):
    """make_batches for one clip set: bucketed batches, a new shuffle each epoch."""
    lengths = [clipset.frames(i) for i in range(len(clipset))]

    def make(epoch):
        return [[(clipset, i) for i in b] for b in bucket_batches(lengths, batch_size, seed * 1000 + epoch)]
    return make


def collate(items, segment_frames):
    """Pad a batch of (clipset, index) items into tensors; audio covers at least one decoder slice."""
    frames = [cs.frames(i) for cs, i in items]
    max_frames = max(max(frames), segment_frames)
    max_tokens = max(len(cs.tokens[i]) for cs, i in items)
    batch = len(items)
    audio = torch.zeros(batch, max_frames * spectrogram.HOP)
    mel = torch.zeros(batch, spectrogram.N_MELS, max_frames)
    ids = torch.zeros(batch, max_tokens, dtype=torch.long)
    id_mask = torch.zeros(batch, max_tokens, dtype=torch.long)
    for b, (cs, i) in enumerate(items):
        pcm = torch.from_numpy(cs.audio[i][:frames[b] * spectrogram.HOP].astype(np.float32) / 32768.0)
        audio[b, :len(pcm)] = pcm
        mel[b, :, :frames[b]] = torch.from_numpy(cs.mels[i].astype(np.float32))
        ids[b, :len(cs.tokens[i])] = torch.from_numpy(cs.tokens[i])
        id_mask[b, :len(cs.tokens[i])] = 1
    tensors = dict(audio=audio, mel=mel, frames=torch.tensor(frames), input_ids=ids, attention_mask=id_mask)
    if items[0][0].speaker_ids is not None:
        tensors["speaker_ids"] = torch.tensor([cs.speaker_ids[i] for cs, i in items])
    return tensors


def to_device(batch, device):
    if device.type != "cuda":
        return batch
    return {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) for k, v in batch.items()}
