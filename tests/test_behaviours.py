"""Behaviours checked against plain references written out here (the original VITS formulas, closed forms,
known values), never against the code under test: the KL term, the alignment's durations, the loss
weights, audio padding, one pass over every clip per epoch, writes that fail half-way, batch auto's
accumulation, prepare_data's re-decoding of a replaced source, the feedback run's "after" samples, and the
terms a step logs."""

import builtins
import errno
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn
from transformers import VitsModel, VitsTokenizer

import checkpoints
import clip_data
import models
import objective
import planning
import prepare_data
import speech
import train_feedback
import train_vits
import training_flags
import vits_trainer
from examples.make_release import SENTENCES, espeak_clip

HOP = 256  # samples per spectrogram frame, as in VITS


# --------------------------------------------------------------------------- helpers


def tiny_trainer(model_dir, *flags):
    """The tiny voice with a fresh critic (seeded), fp32 on the CPU, one micro-batch a step."""
    model, _ = models.load_voice(model_dir)
    models.prepare_for_training(model)
    args = training_flags.parse(["--lr", "2e-4", "--warmup_steps", "0", "--grad_accum", "1", *flags])
    torch.manual_seed(0)
    disc = models.VitsDiscriminator(max_channels=64)
    trainer = vits_trainer.VitsTrainer(model, disc, args, torch.device("cpu"), "fp32")
    trainer.schedule(1000)
    return trainer


def ragged_items(clipset, n=3):
    """n clips of distinct lengths (the shortest such), so the batch holds padding."""
    by_frames = {}
    for i in sorted(range(len(clipset)), key=clipset.frames):
        by_frames.setdefault(clipset.frames(i), i)
    picked = list(by_frames.values())[:n]
    assert len(picked) == n
    return [(clipset, i) for i in picked]


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


# --------------------------------------------------------------------------- 1. KL


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


# --------------------------------------------------------------------------- 2. durations


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


# --------------------------------------------------------------------------- 3. loss weights


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


# --------------------------------------------------------------------------- 4. collate padding


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


# --------------------------------------------------------------------------- 5. one pass per epoch


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


# --------------------------------------------------------------------------- 6. writes that fail half-way


def full_disk_after(monkeypatch, folder, limit):
    """Files opened for writing in `folder` take `limit` bytes, then raise ENOSPC (as a full disk)."""
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            data = bytes(data)
            room = limit - self.written
            if len(data) > room:
                self.f.write(data[:max(room, 0)])
                self.written = limit
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") and \
                os.path.realpath(os.path.dirname(os.path.abspath(file))) == os.path.realpath(folder):
            return FullDisk(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)


def test_a_write_that_fails_half_way_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = str(folder / "checkpoint_epoch_1.pt")
    g = torch.Generator().manual_seed(0)
    first = dict(weights=torch.randn(64, 1024, generator=g), step=1, epoch=1)
    second = dict(weights=torch.randn(64, 1024, generator=g), step=2, epoch=2)
    checkpoints.atomic_torch_save(first, path)
    with monkeypatch.context() as m:
        full_disk_after(m, str(folder), 100_000)  # about a third of the new file
        with pytest.raises(OSError) as err:
            checkpoints.atomic_torch_save(second, path)
    assert err.value.errno == errno.ENOSPC
    loaded = checkpoints.read_checkpoint(path)
    assert loaded["step"] == 1 and loaded["epoch"] == 1 and torch.equal(loaded["weights"], first["weights"])
    assert os.listdir(folder) == ["checkpoint_epoch_1.pt"]  # no temp file left

    data = tmp_path / "data"
    data.mkdir()
    metadata = str(data / "metadata.csv")
    rows = [(f"clip_{i}.wav", f"Ez bi kurdî diaxivim {i}.") for i in range(50)]
    speech.write_metadata(metadata, rows)
    with open(metadata, "rb") as f:
        old = f.read()
    assert old == "".join(f"{n}|{t}\n" for n, t in rows).encode("utf-8")
    with monkeypatch.context() as m:
        full_disk_after(m, str(data), len(old) // 2)
        with pytest.raises(OSError) as err:
            speech.write_metadata(metadata, [(f"new_{i}.wav", "Roj baş, tu çawa yî?") for i in range(80)])
    assert err.value.errno == errno.ENOSPC
    with open(metadata, "rb") as f:
        assert f.read() == old
    assert speech.read_metadata(metadata) == rows
    assert os.listdir(data) == ["metadata.csv"]


# --------------------------------------------------------------------------- 7. batch auto


def test_batch_auto_lowers_grad_accum_to_keep_the_effective_batch(tiny_clips, monkeypatch):
    capacity = 10_000  # bytes the fake GPU lets this process use

    class FakeGpuTrainer:
        device = torch.device("cuda:0")

        def __init__(self, fits_up_to):
            self.fits_up_to, self.peak, self.tried = fits_up_to, 0, []
            self.model, self.disc = nn.Linear(1, 1), nn.Linear(1, 1)
            self.opt_g = torch.optim.SGD(self.model.parameters(), 0.1)
            self.opt_d = torch.optim.SGD(self.disc.parameters(), 0.1)
            self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda s: 1.0)
            self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, lambda s: 1.0)
            self.scaler = torch.amp.GradScaler("cpu", enabled=False)
            self.step = self.bad_steps = self.skipped_steps = 0

        def train_window(self, batches, d_only=False):
            b = len(batches[0]["frames"])
            self.tried.append(b)
            if b > self.fits_up_to:
                raise torch.OutOfMemoryError("CUDA out of memory")
            self.peak = 100 * b  # well inside the 10% headroom
            return {}

    monkeypatch.setattr(planning, "gpu_memory_bytes", lambda device: capacity)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    args = train_vits.parse_args(["--batch_size", "auto", "--grad_accum", "4"])
    effective = 8 * 4
    for limit in (5, 3, 16, 100):
        trainer = FakeGpuTrainer(limit)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None, t=trainer: t.peak)
        batch, accum = planning.choose_batch_size(trainer, tiny_clips, args)
        plain = max(d for d in range(1, effective + 1) if effective % d == 0 and d <= limit)
        assert (batch, accum) == (plain, effective // plain), limit
        assert batch * accum == effective and effective % batch == 0
        assert trainer.tried and max(t for t in trainer.tried if t <= limit) == plain
    assert args.grad_accum == 4  # the parsed flags stay as given


# --------------------------------------------------------------------------- 8. prepare_data re-run


def test_prepare_rerun_decodes_a_source_replaced_by_audio_of_the_same_size(kmr_release, prepared_dataset,
                                                                           tiny_model_dir, tmp_path):
    release, out = tmp_path / "release", tmp_path / "out"
    shutil.copytree(kmr_release, release)  # copy2: sizes and mtimes kept, so the copied cache still holds
    shutil.copytree(prepared_dataset, out)
    with open(os.path.join(prepared_dataset, "metadata.csv"), encoding="utf-8") as f:
        name = f.readline().split("|", 1)[0]
    source = release / "clips" / (os.path.splitext(name)[0] + ".mp3")
    assert source.is_file()
    # The clip's source as mono 16-bit WAV at its own rate (libsndfile reads it by its header, not its name).
    pcm, sr = sf.read(str(source), dtype="int16")
    pcm = pcm if pcm.ndim == 1 else pcm[:, 0]
    sf.write(str(source), pcm, sr, format="WAV", subtype="PCM_16")
    flags = ["--model", tiny_model_dir, "--output_dir", str(out), "--workers", "1"]
    report = prepare_data.main(["--input", str(release), *flags])
    assert report["decoded_clips"] == 1
    before, _ = sf.read(str(out / "wavs" / name), dtype="int16")
    assert np.abs(before).max() > 1000

    # Replaced by other audio of exactly the same size: the same samples negated, a new mtime.
    size, mtime = os.path.getsize(source), os.stat(source).st_mtime_ns
    sf.write(str(source), np.clip(-pcm.astype(np.int32), -32768, 32767).astype(np.int16), sr, format="WAV",
             subtype="PCM_16")
    os.utime(source, ns=(mtime + 5 * 10 ** 9, mtime + 5 * 10 ** 9))
    assert os.path.getsize(source) == size
    report = prepare_data.main(["--input", str(release), *flags])
    assert report["decoded_clips"] == 1
    after, _ = sf.read(str(out / "wavs" / name), dtype="int16")
    # Negation commutes with trimming (power) and rounding: the new output is the old one negated.
    assert len(after) == len(before)
    assert np.abs(after.astype(np.int32) + before.astype(np.int32)).max() <= 1
    assert not np.array_equal(after, before)


# --------------------------------------------------------------------------- 9. feedback "after" samples


def test_feedback_after_samples_are_the_tuned_voices_speech(tiny_model_dir, tmp_path):
    model, tokenizer = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    torch.manual_seed(0)
    voice = str(tmp_path / "voice" / "final_model")
    models.export_voice(model, tokenizer, models.VitsDiscriminator(max_channels=64), voice)
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    rows = []
    for k, text in enumerate(SENTENCES[7:11]):
        sf.write(str(feedback / f"fb_{k}.wav"), espeak_clip(text, 16000), 16000)
        rows.append(f"fb_{k}.wav|{text}")
    (feedback / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = str(tmp_path / "run")
    code = train_feedback.main(["--model", voice, "--data_dir", str(tmp_path / "no_data"),
                                "--feedback_dir", str(feedback), "--output_dir", out, "--max_steps", "2",
                                "--eval_clips", "0", "--device", "cpu", "--batch_size", "2", "--grad_accum", "1",
                                "--disc_channels", "64", "--benchmark_samples", "0", "--num_workers", "1",
                                "--warmup_steps", "0", "--d_warmup_steps", "0", "--lr", "2e-3"])
    assert code == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        spoken = json.load(f)["samples"]["feedback"]  # {sample file: sentence}, in the order spoken
    assert sorted(spoken) == [f"fb_{k}.wav" for k in range(4)]  # texts as cleaned for the voice

    # The tuned voice speaks each sentence as synthesise does: one seed, then the sentences in order.
    final = os.path.join(out, "final_model")
    tuned = VitsModel.from_pretrained(final).eval()
    tok = VitsTokenizer.from_pretrained(final, split_special_tokens=True)
    expected = {}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for name, text in spoken.items():
            ids = torch.tensor([tok(text, split_special_tokens=True).input_ids])
            audio = tuned(input_ids=ids).waveform[0].numpy().astype(np.float64)
            expected[name] = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int32)
    for name, want in expected.items():
        after, sr = sf.read(os.path.join(out, "samples", "after", "feedback", name), dtype="int16")
        before, _ = sf.read(os.path.join(out, "samples", "before", "feedback", name), dtype="int16")
        assert sr == 16000 and len(after) == len(want) > 0, name
        assert np.abs(after.astype(np.int32) - want).max() <= 2, name
        assert len(before) != len(after) or np.abs(before.astype(np.int32) - after).max() > 100, name


# --------------------------------------------------------------------------- logged terms


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
