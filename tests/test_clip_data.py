"""clip_data.py: clips preloaded into RAM (bit-exact, in spawned workers, cached and rebuilt), collated with
exact zero padding, and every clip trained once an epoch."""

import glob
import os
import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from voicetune.common import run_errors
from voicetune.night import clip_data
from voicetune.voice import models
import train_vits
from voicetune.night import vits_trainer
from conftest import ragged_items


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


def test_preload_decodes_in_spawned_workers_as_on_windows(tiny_clips, prepared_dataset, tmp_path,
                                                          spawn_start_method):
    clips, errors = clip_data.load_clips(prepared_dataset, 16000, str(tmp_path / "cache"), 1)  # one worker process
    assert errors == [] and [c[0] for c in clips] == tiny_clips.names
    assert all(np.array_equal(c[2], a) and np.array_equal(c[3], m) for c, a, m in
               zip(clips, tiny_clips.audio, tiny_clips.mels))


def test_preload_cache_is_reused_and_rebuilt_when_a_clip_changes(prepared_dataset, tmp_path, capsys, monkeypatch):
    data = str(tmp_path / "data")
    shutil.copytree(prepared_dataset, data)
    cache = str(tmp_path / "cache")
    first, _ = clip_data.load_clips(data, 16000, cache, 1)
    capsys.readouterr()
    cached, _ = clip_data.load_clips(data, 16000, cache, 1)
    assert "from cache" in capsys.readouterr().out
    for a, b in zip(first, cached):
        assert a[0] == b[0] and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])

    name = first[0][0]
    sf.write(os.path.join(data, "wavs", name), np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    rebuilt, _ = clip_data.load_clips(data, 16000, cache, 1)
    assert "from cache" not in capsys.readouterr().out
    assert not np.any(dict((c[0], c[2]) for c in rebuilt)[name])
    assert len(glob.glob(os.path.join(cache, "preload_*.npz"))) == 1

    # What psutil reports on every system (the check must not need Linux's /proc/meminfo).
    monkeypatch.setattr(clip_data.psutil, "virtual_memory", lambda: SimpleNamespace(available=1000, total=2000))
    shutil.rmtree(cache)
    with pytest.raises(run_errors.TrainingError, match="GiB"):
        clip_data.load_clips(data, 16000, cache, 1)


def test_a_damaged_preload_cache_is_rebuilt(prepared_dataset, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    first, _ = clip_data.load_clips(prepared_dataset, 16000, cache, 1)
    [path] = glob.glob(os.path.join(cache, "preload_*.npz"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    again, _ = clip_data.load_clips(prepared_dataset, 16000, cache, 1)
    assert "rebuilding" in capsys.readouterr().out
    assert [c[0] for c in again] == [c[0] for c in first]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(first, again))
    clip_data.load_clips(prepared_dataset, 16000, cache, 1)
    assert "from cache" in capsys.readouterr().out


def test_clips_with_more_tokens_than_frames_are_dropped_and_counted(tiny_model_dir):
    _, tokenizer = models.load_voice(tiny_model_dir)
    pcm = np.zeros(16000, dtype=np.int16)
    mel = np.zeros((80, 62), dtype=np.float16)
    clips = clip_data.ClipSet([("ok", "roj baş", pcm, mel), ("long", "ez bi kurdî diaxivim " * 4, pcm, mel)], tokenizer)
    assert clips.names == ["ok"]
    assert clips.dropped == {"more tokens than frames": 1}


HOP = 256  # samples per spectrogram frame, as in VITS


def test_collate_pads_audio_with_exact_zeros(tiny_clips):
    items = ragged_items(tiny_clips, 3)
    longest = max(cs.frames(i) for cs, i in items)
    for segment in (32, longest + 7):  # the slice may be longer than every clip: audio covers it
        batch = clip_data.collate(items, segment)
        width = max(longest, segment)
        assert batch["audio"].shape == (3, width * HOP) and batch["mel"].shape[2] == width
        for b, (cs, i) in enumerate(items):
            n = cs.mels[i].shape[1] * HOP
            plain = torch.from_numpy(cs.audio[i][:n].astype(np.float64) / 32768.0).float()
            assert torch.equal(batch["audio"][b, :len(plain)], plain)
            assert torch.equal(batch["audio"][b, len(plain):], torch.zeros(width * HOP - len(plain)))
            assert (batch["audio"][b, len(plain):] == 0.0).all()
            frames = cs.mels[i].shape[1]
            assert torch.equal(batch["mel"][b, :, :frames], torch.from_numpy(cs.mels[i].astype(np.float32)))
            assert torch.equal(batch["mel"][b, :, frames:], torch.zeros(batch["mel"].size(1), width - frames))


class Lengths:
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def frames(self, i):
        return self.lengths[i]


def test_every_clip_is_trained_once_per_epoch_when_batches_do_not_divide(prepared_dataset, tiny_model_dir,
                                                                         tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    clipset = Lengths([int(x) for x in rng.integers(40, 60, 12)])  # ties too
    for batch_size in (5, 7):
        make = clip_data.epoch_batches(clipset, batch_size, 1234)
        for epoch in range(1, 5):
            batches = make(epoch)
            assert Counter(i for b in batches for _, i in b) == Counter(range(12)), (batch_size, epoch)
            assert all(1 <= len(b) <= batch_size for b in batches)

    # Through the real loop: the names that reach train_window in epoch 1.
    names_of = {}
    collate = clip_data.collate

    def recording_collate(items, segment_frames):
        batch = collate(items, segment_frames)
        names_of[id(batch)] = [cs.names[i] for cs, i in items]
        return batch

    trained = []
    train_window = vits_trainer.VitsTrainer.train_window

    def recording_window(self, batches, d_only=False):
        trained.extend(name for batch in batches for name in names_of[id(batch)])
        return train_window(self, batches, d_only=d_only)

    monkeypatch.setattr(clip_data, "collate", recording_collate)
    monkeypatch.setattr(vits_trainer.VitsTrainer, "train_window", recording_window)
    with open(os.path.join(prepared_dataset, "metadata.csv"), encoding="utf-8") as f:
        listed = [line.split("|", 1)[0] for line in f if line.strip()]
    assert len(listed) >= 11 and len(listed) % 5  # a partial batch at the epoch's end
    code = train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset,
                            "--output_dir", str(tmp_path / "run"), "--batch_size", "5", "--grad_accum", "2",
                            "--benchmark_samples", "0", "--epochs", "1", "--eval_clips", "0", "--val_size", "0",
                            "--device", "cpu", "--disc_channels", "64", "--num_workers", "1",
                            "--d_warmup_steps", "0", "--warmup_steps", "1"])
    assert code == 0
    assert Counter(trained) == Counter(listed)
