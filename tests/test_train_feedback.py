"""train_feedback.py: feedback clips in any format, replay batches, a tuned copy that leaves the input alone."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from transformers import pipeline, VitsModel, VitsTokenizer

from voicetune.common import speech
from voicetune.feedback import feedback_run
from voicetune.night import clip_data
from voicetune.voice import models
import train_feedback
import train_feedback as tf
from voicetune.voice import voice_quality
from conftest import FEEDBACK_QUICK, GOOD_FEEDBACK
from examples.make_release import espeak_clip, SENTENCES


def tree_hashes(folder):
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            hashes[os.path.relpath(path, folder)] = (digest, os.stat(path).st_mtime_ns)
    return hashes


def test_main_tunes_a_copy_and_reports_before_and_after(trained_voice, feedback_dir, prepared_dataset, tmp_path,
                                                          capsys):
    before = tree_hashes(trained_voice)
    out = str(tmp_path / "run")
    code = tf.main(["--model", trained_voice, "--data_dir", prepared_dataset, "--feedback_dir", feedback_dir,
                    "--output_dir", out, "--max_steps", "2", "--eval_clips", "1"] + FEEDBACK_QUICK)
    assert code == 0
    printed = capsys.readouterr().out

    # The input voice is untouched, byte for byte; the tuned one is new, different, and loads.
    assert tree_hashes(trained_voice) == before
    tuned = load_file(os.path.join(out, "final_model", "model.safetensors"))
    original = load_file(os.path.join(trained_voice, "model.safetensors"))
    assert tuned.keys() == original.keys()
    # One AdamW step at lr 1e-5 moves weights by about 1e-5; an export round trip alone moves them ~6e-8.
    assert max(float((tuned[k].float() - original[k].float()).abs().max()) for k in tuned) > 5e-6
    assert models.load_discriminator(os.path.join(out, "final_model", "discriminator.pt")).max_channels == 64
    spoken = pipeline("text-to-speech", model=os.path.join(out, "final_model"), device="cpu")("Roj baş.")
    assert spoken["sampling_rate"] == 16000 and spoken["audio"].size > 0
    assert f"critic: {os.path.join(trained_voice, 'discriminator.pt')}, saved beside --model" in printed

    # Before and after samples of every feedback sentence the voice can say (also the one whose
    # recording is corrupt) and of the fixed sentences, under the same names.
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    expected = sorted([os.path.splitext(name)[0] + ".wav" for name, *_ in GOOD_FEEDBACK] + ["corrupt.wav"])
    for when in ("before", "after"):
        assert sorted(os.listdir(os.path.join(out, "samples", when, "feedback"))) == expected
        assert len(os.listdir(os.path.join(out, "samples", when, "eval"))) == len(voice_quality.DEFAULT_SENTENCES)
    audio, sr = sf.read(os.path.join(out, "samples", "after", "feedback", "flac_stereo.wav"))
    assert sr == 16000 and audio.ndim == 1 and len(audio) > 0
    assert len(os.listdir(os.path.join(out, "samples", "recorded"))) == len(GOOD_FEEDBACK)
    # Silent edges are trimmed from feedback as prepare_data.py trims training clips.
    recorded = sf.info(os.path.join(out, "samples", "recorded", "wav_16k.wav")).frames
    assert recorded < sf.info(os.path.join(feedback_dir, "wav_16k.wav")).frames - 1.5 * 16000
    assert sorted(report["samples"]["feedback"]) == expected

    # Bad clips by reason; every good format was read; validation before and after on both sources.
    assert report["feedback"]["skipped"] == {"corrupt_audio": 1, "unreadable_number": 1}
    assert {s["file"] for s in report["feedback"]["skipped_clips"]} == {"corrupt.wav", "unreadable.wav"}
    assert report["feedback"]["trained"] + report["feedback"]["held_out"] == len(GOOD_FEEDBACK)
    assert report["feedback"]["held_out"] == 1
    assert report["steps"] == 2 and report["stop_reason"] == "max_steps"
    assert report["minutes"] > 0
    for name in ("feedback", "original", "feedback_trained"):
        row = report["validation_mel"][name]
        assert np.isfinite(row["before"]) and np.isfinite(row["after"]), name
        assert row["change"] == pytest.approx(row["after"] - row["before"])
        # Voice quality of the same sets before and after, spoken from text alone.
        for key in ("mcd", "dur_ratio", "dnsmos_ovrl"):
            row = report["quality"][key][name]
            assert row["before"] == report["before"][name][key] and row["after"] == report["after"][name][key]
            assert row["change"] == pytest.approx(row["after"] - row["before"])
    assert "MCD-DTW, dB (lower is better):" in printed
    assert report["original"]["held_out"] == 1 and report["original"]["replay_ratio"] == 0.5
    # 5 feedback clips x weight 1, each batch of 2 with one replayed clip.
    assert report["items_per_epoch"] == {"feedback": 5, "original": 5}


def make_clipset(tokenizer, prefix, frames):
    clips = [(f"{prefix}{i}", "roj baş", np.zeros(f * 256, np.int16), np.zeros((80, f), np.float16))
             for i, f in enumerate(frames)]
    return clip_data.ClipSet(clips, tokenizer)


def test_replay_batches_hold_both_sources_in_ratio(tiny_model_dir):
    _, tokenizer = models.load_voice(tiny_model_dir)
    feedback = make_clipset(tokenizer, "fb", [40 + 7 * i for i in range(10)])
    original = make_clipset(tokenizer, "orig", [30 + 3 * i for i in range(100)])
    make = feedback_run.mixed_batches(feedback, original, batch_size=4, replay_ratio=0.5, feedback_weight=3, seed=1)
    batches = make(1)
    for batch in batches:
        sources = [cs for cs, _ in batch]
        assert feedback in sources and original in sources
        assert sources.count(feedback) == sources.count(original) == len(batch) // 2
    fb_used = [i for b in batches for cs, i in b if cs is feedback]
    orig_used = [i for b in batches for cs, i in b if cs is original]
    assert sorted(fb_used) == sorted(list(range(10)) * 3)  # every feedback clip feedback_weight times
    assert len(orig_used) == len(fb_used) == 30 and len(set(orig_used)) == 30  # replayed clips once each
    # Deterministic per epoch (resume replays the same order); the next epoch replays other clips.
    assert make(1) == batches
    assert not set(orig_used) & {i for b in make(2) for cs, i in b if cs is original}

    # A quarter of replay, and a fractional weight.
    make = feedback_run.mixed_batches(feedback, original, batch_size=4, replay_ratio=0.25, feedback_weight=1.5,
                                      seed=1)
    counts = [sum(cs is original for cs, _ in b) for b in make(1)]
    assert set(counts) == {1}
    assert sum(cs is feedback for b in make(1) for cs, _ in b) == 15

    # No original data, or no replay: feedback alone.
    for make in (feedback_run.mixed_batches(feedback, None, 4, 0.5, 1, 1),
                 feedback_run.mixed_batches(feedback, original, 4, 0.0, 1, 1)):
        assert all(cs is feedback for b in make(1) for cs, _ in b)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_dir_on_the_input_model_is_refused(trained_voice, feedback_dir, where, capsys):
    before = tree_hashes(trained_voice)
    out = trained_voice if where == "same" else os.path.join(trained_voice, "tuned")
    with pytest.raises(SystemExit) as exit_info:
        tf.main(["--model", trained_voice, "--feedback_dir", feedback_dir, "--feedback_only", "--output_dir", out,
                 "--max_steps", "1"]
                + FEEDBACK_QUICK)
    assert exit_info.value.code == 2
    assert "overlaps --model" in capsys.readouterr().err
    assert tree_hashes(trained_voice) == before


def test_make_session_writes_samples_and_a_template(trained_voice, tmp_path, capsys):
    sentences = tmp_path / "sentences.txt"
    sentences.write_text(f"{SENTENCES[9]}\n\nEw $25 e.\n{SENTENCES[11]}\n", encoding="utf-8")
    out = str(tmp_path / "session")
    assert tf.main(["--model", trained_voice, "--make_session", str(sentences), "--output_dir", out,
                    "--device", "cpu"]) == 0
    assert "left out (unreadable_number): Ew $25 e." in capsys.readouterr().out
    for name, sentence in (("s001", SENTENCES[9]), ("s002", SENTENCES[11])):
        with open(os.path.join(out, f"{name}.txt"), encoding="utf-8") as f:
            assert f.read() == f"{sentence}\n"
        audio, sr = sf.read(os.path.join(out, "model", f"{name}.wav"))
        assert sr == 16000 and len(audio) > 0
    assert os.path.isfile(os.path.join(out, "README.txt")) and not os.path.exists(os.path.join(out, "metadata.csv"))
    # The kit is a feedback folder once a recording is saved into it; unrecorded sentences are no clips.
    sf.write(os.path.join(out, "s002.flac"), espeak_clip(SENTENCES[11], 22050), 22050)
    assert feedback_run.read_pairs(out) == ([("s002.flac", SENTENCES[11])], [])
    _, vocab = speech.load_vocab(trained_voice)
    assert speech.clean_text(SENTENCES[11], vocab)[1] is None
    shutil.rmtree(out)


def test_a_folder_of_wav_and_txt_pairs_tunes_the_voice_alone_without_original_data(trained_voice, tmp_path,
                                                                                    capsys):
    folder = tmp_path / "feedback"
    os.makedirs(folder / "model")
    for i, (name, text, sr, stereo, fmt) in enumerate(GOOD_FEEDBACK[:4]):
        sf.write(folder / name, espeak_clip(text, sr, stereo=stereo), sr, format=fmt)
        (folder / (os.path.splitext(name)[0] + ".txt")).write_text(text + "\n", encoding="utf-8-sig" if i else "utf-8")
    sf.write(folder / "no_text.wav", espeak_clip(SENTENCES[20], 16000), 16000)
    sf.write(folder / "empty.wav", espeak_clip(SENTENCES[21], 16000), 16000)
    (folder / "empty.txt").write_text(" \n", encoding="utf-8")
    (folder / "README.txt").write_text("not a clip\n", encoding="utf-8")
    sf.write(folder / "model" / "s001.wav", espeak_clip(SENTENCES[22], 16000), 16000)  # subfolders are not read
    out = str(tmp_path / "run")
    code = tf.main(["--model", trained_voice, "--feedback_only", "--feedback_dir",
                    str(folder), "--output_dir", out, "--max_steps", "1"] + FEEDBACK_QUICK)
    assert code == 0
    assert "no original training data" in capsys.readouterr().out
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["original"]["replay_ratio"] == 0.0
    assert report["items_per_epoch"]["original"] == 0
    assert report["validation_mel"]["original"]["before"] is None
    assert np.isfinite(report["validation_mel"]["feedback"]["after"])
    assert os.path.isfile(os.path.join(out, "final_model", "model.safetensors"))
    feedback = report["feedback"]
    assert feedback["listed"] == 6 and feedback["trained"] + feedback["held_out"] == 4
    assert {(s["file"], s["reason"]) for s in feedback["skipped_clips"]} == {("no_text.wav", "no_text"),
                                                                              ("empty.wav", "empty_text")}
    assert sorted(os.listdir(os.path.join(out, "samples", "recorded"))) == sorted(
        os.path.splitext(name)[0] + ".wav" for name, *_ in GOOD_FEEDBACK[:4])

    # A metadata.csv beside the pairs wins: only the clip it lists is used.
    (folder / "metadata.csv").write_text(f"{GOOD_FEEDBACK[1][0]}|{GOOD_FEEDBACK[1][1]}\n", encoding="utf-8")
    tokenizer = models.load_voice(trained_voice)[1]
    _, vocab = speech.load_vocab(trained_voice)
    clipset, sentences, skipped, listed = feedback_run.load_feedback(str(folder), tokenizer, vocab, 16000,
                                                                     str(tmp_path / "cache"), 1)
    assert clipset.names == [GOOD_FEEDBACK[1][0]] and (skipped, listed) == ([], 1)


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
    code = train_feedback.main(["--model", voice, "--feedback_only",
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


def test_a_trimmed_preload_never_takes_an_untrimmed_cache(feedback_dir, tmp_path):
    entries = [("wav_16k.wav", "roj baş")]
    cache = str(tmp_path / "cache")
    whole, _ = clip_data.load_clips(feedback_dir, 16000, cache, 1, audio_subdir="", entries=entries)
    skipped = []
    trimmed, _ = clip_data.load_clips(feedback_dir, 16000, cache, 1, audio_subdir="", entries=entries, trim=True,
                                      skipped=skipped)
    # The recording has a second of room noise on each side, trimmed only when asked.
    assert len(trimmed[0][2]) < len(whole[0][2]) - 1.5 * 16000 and skipped == []
    assert trimmed[0][3].shape[1] == len(trimmed[0][2]) // 256  # its mel is the trimmed audio's


def test_a_tune_refused_before_it_wrote_anything_leaves_no_run_folder(trained_voice, prepared_dataset, tmp_path,
                                                                      capsys):
    data = shutil.copytree(prepared_dataset, tmp_path / "training")
    (data / "feedback").mkdir()  # the listening page saved nothing yet
    assert tf.main(["--model", trained_voice, "--data_dir", str(data)] + FEEDBACK_QUICK) == 2
    assert f"error: --feedback_dir {data / 'feedback'}: no recordings listed" in capsys.readouterr().err
    assert not (data / "feedback_models").exists()
