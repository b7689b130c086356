"""speak.py: what the voice reads, every flag changing the audio where the model reads it, and the ONNX voice as
sherpa-onnx and onnxruntime run it, on the tiny model."""

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import sherpa_onnx
import soundfile as sf
import torch
from transformers import VitsModel

from voicetune.voice import onnx_voice
import speak
from voicetune.common import speech
from voicetune.voice import speaking
from examples.tiny_model import make_tokenizer, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOP = 256  # the tiny model's upsampling: 8 * 8 * 2 * 2
# Every letter of the tiny vocabulary, capitals and typographic apostrophes as users type them.
EVERY_LETTER = ["Wan’ê û Qur’an", "ÇÊÎŞÛ çêîşû Abcdefghijklmnopqrstuvwxyz", "A",
                "Roj li pişt çiyayan ava dibe û ev çîrok ji kalê min maye wexta ku em zarok bûn"]


def run(*argv):
    return speak.main([str(a) for a in argv])


def wav(path):
    audio, sr = sf.read(path, dtype="float32")
    assert sr == 16000
    return audio


def quiet(model_dir, text, tmp_path, *flags, name="out.wav"):
    """TEXT spoken by speak.py with FLAGS; the samples of the WAV."""
    model = ["--model", model_dir] if model_dir else []
    assert run(text, *model, "--out", tmp_path / name, *flags) == 0
    return wav(tmp_path / name)


@pytest.fixture(scope="module")
def two_speaker_dir(tmp_path_factory):
    """The tiny voice with two speakers (random speaker embeddings: two audibly different voices)."""
    out = str(tmp_path_factory.mktemp("two_speakers"))
    torch.manual_seed(1)
    tokenizer = make_tokenizer(out)
    config = tiny_config(len(tokenizer))
    config.num_speakers, config.speaker_embedding_size = 2, 16
    VitsModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "voice"
    assert run("--model", tiny_model_dir, "--export_onnx", out) == 0
    return str(out)


def sherpa(folder, **scales):
    vits = sherpa_onnx.OfflineTtsVitsModelConfig(model=os.path.join(folder, "model.onnx"),
                                                 tokens=os.path.join(folder, "tokens.txt"), **scales)
    config = sherpa_onnx.OfflineTtsConfig(model=sherpa_onnx.OfflineTtsModelConfig(vits=vits, num_threads=1),
                                          silence_scale=1.0)  # sherpa-onnx shortens pauses unless told not to
    return sherpa_onnx.OfflineTts(config)


def torch_says(model_dir, text, speaker_id=None, rate=None):
    """The torch voice at zero noise on `text` as our text cleaning reads it."""
    model, tokenizer = speaking.load(model_dir, noise_scale=0.0, noise_scale_duration=0.0, speaking_rate=rate)
    cleaned, reason = speech.clean_text(text, speech.load_vocab(model_dir)[1])
    assert reason is None
    return speaking.say(model, tokenizer, cleaned, speaker_id)


def same_audio(a, b):
    assert len(a) == len(b)
    assert np.corrcoef(a, b)[0, 1] >= 0.999


# Golden readings from the sources of tests/test_kurmanji_text.py (USER, ZINAR, THACKSTON, WIKT), as the voice
# reads them: lowercase, punctuation gone, a longer text split at its sentence ends.
DRY_RUN = [
    ("Ez 25 salî me.", "ez bîst û pênc salî me"),
    ("Di sala 1987an de.", "di sala hezar û neh sed û heştê û heftan de"),
    ("Ew 1em e! Ew 2yem e?", "ew yekem e | ew duyem e"),
    ("%25 ji me, 3yem.", "ji sedî bîst û pênc ji me sêyem"),
    ("Wan’ê û “bavo” 1.000 kes.", "wan'ê û bavo hezar kes"),
]


def test_dry_run_prints_what_the_voice_will_read(tiny_model_dir, tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"{raw}\n" for raw, _ in DRY_RUN), encoding="utf-8")
    assert run("--file", lines, "--model", tiny_model_dir, "--dry_run", "--out_dir", tmp_path / "out") == 0
    assert capsys.readouterr().out.splitlines() == [read for _, read in DRY_RUN]
    assert not os.path.exists(tmp_path / "out")


def test_a_line_it_cannot_read_stops_everything_with_the_reason(tiny_model_dir, tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("Roj baş.\nEw $25 e.\n", encoding="utf-8")
    assert run("--file", lines, "--model", tiny_model_dir, "--out_dir", tmp_path / "out") == 2
    assert f"{lines} line 2: 'Ew $25 e.': cannot be read: $: a currency sign" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")  # nothing spoken, not even the good first line
    assert run("Ew $25 e.", "--model", tiny_model_dir, "--reading", "$=dolar", "--dry_run") == 0
    assert capsys.readouterr().out == "ew bîst û pênc dolar e\n"
    assert run("Привет", "--model", tiny_model_dir, "--dry_run") == 2
    assert "another script" in capsys.readouterr().err


def test_file_gives_one_wav_a_line_and_says_which(tiny_model_dir, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("Roj baş.\n\nEz 25 salî me.\n", encoding="utf-8")
    assert run("--file", lines, "--model", tiny_model_dir, "--out_dir", tmp_path / "out") == 0
    assert speech.read_metadata(tmp_path / "out" / "lines.csv") == [("line_001.wav", "Roj baş."),
                                                                    ("line_002.wav", "Ez 25 salî me.")]
    assert len(wav(tmp_path / "out" / "line_002.wav")) > len(wav(tmp_path / "out" / "line_001.wav"))


def test_speaking_rate_scales_every_duration_as_vits_does(tiny_model_dir, tmp_path, monkeypatch):
    """Length in samples = hop * sum(ceil(exp(logw) / rate)) over the ids (VITS's duration, closed form), with
    logw the duration predictor's own output for this text."""
    logw, real_load = [], speaking.load

    def load(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        model.duration_predictor.register_forward_hook(lambda module, inputs, out: logw.append(out.detach()))
        return model, tokenizer
    monkeypatch.setattr(speaking, "load", load)
    text = "Roj li pişt çiyayan ava dibe"
    lengths = {}
    for rate in (1.0, 2.0, 0.5):
        audio = quiet(tiny_model_dir, text, tmp_path, "--speaking_rate", rate, "--noise_scale_duration", "0")
        expected = HOP * int(torch.ceil(torch.exp(logw[-1]) / rate).sum())
        assert len(audio) == expected
        lengths[rate] = len(audio)
    n_ids = len(speech.token_ids(speech.load_tokenizer(tiny_model_dir), "roj li pişt çiyayan ava dibe"))
    # Proportional, up to the rounding up of each id's duration.
    assert abs(2 * lengths[2.0] - lengths[1.0]) <= 2 * n_ids * HOP
    assert abs(lengths[0.5] - 2 * lengths[1.0]) <= n_ids * HOP


def test_noise_flags_and_seed_change_the_audio_where_the_model_reads_them(tiny_model_dir, tmp_path):
    text = "Roj baş e"
    say = lambda *flags: quiet(tiny_model_dir, text, tmp_path, *flags)
    still = ("--noise_scale", "0", "--noise_scale_duration", "0")
    # With both noises off, the seed changes nothing: the noise really is off.
    np.testing.assert_array_equal(say(*still, "--seed", "1"), say(*still, "--seed", "2"))
    # Each noise on its own makes seeds differ: the sound (same length) ...
    sound1, sound2 = (say("--noise_scale", "1", "--noise_scale_duration", "0", "--seed", s) for s in "12")
    assert len(sound1) == len(sound2) and not np.array_equal(sound1, sound2)
    # ... and the rhythm.
    takes = [say("--noise_scale", "0", "--noise_scale_duration", "1", "--seed", s) for s in "1234"]
    assert len({len(t) for t in takes}) > 1
    # The same seed, the same take; the voice's own noise by default.
    np.testing.assert_array_equal(say("--seed", "7"), say("--seed", "7"))
    assert not np.array_equal(say("--seed", "7"), say(*still))


def test_speaker_id_picks_the_speaker(two_speaker_dir, tmp_path, capsys):
    still = ("--noise_scale", "0", "--noise_scale_duration", "0")
    first = quiet(two_speaker_dir, "Roj baş e", tmp_path, "--speaker_id", "0", *still)
    second = quiet(two_speaker_dir, "Roj baş e", tmp_path, "--speaker_id", "1", *still)
    same_audio(first, torch_says(two_speaker_dir, "Roj baş e", 0))
    assert len(first) != len(second) or not np.allclose(first, second, atol=1e-3)
    assert run("Roj", "--model", two_speaker_dir, "--out", tmp_path / "x.wav") == 2
    assert "--speaker_id 0-1" in capsys.readouterr().err


def test_sentences_are_spoken_whole_with_the_pause_between_them(tiny_model_dir, tmp_path):
    still = ("--noise_scale", "0", "--noise_scale_duration", "0")
    one = quiet(tiny_model_dir, "Roj baş e.", tmp_path, *still, name="one.wav")
    exact = torch_says(tiny_model_dir, "Roj baş e.")
    assert len(one) == len(exact)  # the voice's output, nothing added
    np.testing.assert_allclose(one, exact, atol=1e-4)  # to a step of 16-bit PCM
    two = quiet(tiny_model_dir, "Roj baş e. Ez 25 salî me, tu çawa yî?", tmp_path, *still, "--sentence_pause", "0.5")
    second = torch_says(tiny_model_dir, "Ez 25 salî me, tu çawa yî?")  # the comma does not split it
    expected = np.concatenate([exact, np.zeros(8000, np.float32), second])
    assert len(two) == len(expected)
    np.testing.assert_allclose(two, expected, atol=1e-4)


def test_default_model_is_the_current_voice(tiny_model_dir, two_speaker_dir, tmp_path, capsys):
    data = tmp_path / "training"
    assert run("Roj baş", "--data_dir", data, "--dry_run") == 2
    assert f"no voice in --data_dir {data}" in capsys.readouterr().err
    shutil.copytree(tiny_model_dir, data / "final_model")
    assert run("Roj baş", "--data_dir", data, "--out", tmp_path / "a.wav") == 0
    shutil.copytree(two_speaker_dir, data / "voice")  # a promoted tune: speaks from now on
    assert run("Roj baş", "--data_dir", data, "--out", tmp_path / "b.wav") == 2
    assert "this voice has 2 speakers" in capsys.readouterr().err


def test_sherpa_onnx_says_what_the_torch_voice_says(exported, tiny_model_dir):
    tts = sherpa(exported, noise_scale=0.0, noise_scale_w=0.0, length_scale=1.0)
    assert tts.sample_rate == 16000
    for text in EVERY_LETTER:
        same_audio(np.array(tts.generate(text, sid=0, speed=1.0).samples), torch_says(tiny_model_dir, text))
    # sherpa-onnx's speed is 1 / length_scale, our speaking rate.
    same_audio(np.array(tts.generate(EVERY_LETTER[3], sid=0, speed=2.0).samples),
               torch_says(tiny_model_dir, EVERY_LETTER[3], rate=2.0))


def test_a_multi_speaker_export_speaks_each_speaker(two_speaker_dir, tmp_path):
    assert run("--model", two_speaker_dir, "--export_onnx", tmp_path / "voice") == 0
    tts = sherpa(str(tmp_path / "voice"), noise_scale=0.0, noise_scale_w=0.0, length_scale=1.0)
    assert tts.num_speakers == 2
    said = [np.array(tts.generate(EVERY_LETTER[0], sid=sid).samples) for sid in (0, 1)]
    for sid in (0, 1):
        same_audio(said[sid], torch_says(two_speaker_dir, EVERY_LETTER[0], sid))
    assert len(said[0]) != len(said[1]) or not np.allclose(said[0], said[1], atol=1e-3)


def test_a_graph_that_differs_from_the_voice_is_not_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Traced on a short example with transformers' own relative attention, the graph keeps the example's
    branch and fails on longer text: the check catches it and an earlier export stays as it was."""
    from transformers.models.vits import modeling_vits

    monkeypatch.setattr(onnx_voice, "TRACE_EXAMPLE", [0, 5, 0])  # shorter than the attention window
    assert run("--model", tiny_model_dir, "--export_onnx", tmp_path / "ours") == 0  # our window holds at any length
    shutil.rmtree(tmp_path / "ours")
    out = tmp_path / "voice"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the earlier export")
    monkeypatch.setattr(onnx_voice, "relative_embeddings", modeling_vits.VitsAttention._get_relative_embeddings)
    assert run("--model", tiny_model_dir, "--export_onnx", out) == 2
    assert "not written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["voice"] and os.listdir(out) == ["model.onnx"]
    assert (out / "model.onnx").read_bytes() == b"the earlier export"


def test_onnx_speaks_without_torch(exported, tiny_model_dir, tmp_path):
    out = tmp_path / "onnx.wav"
    code = ("import sys, speak\n"
            f"rc = speak.main(['Ez 25 salî me, Wan’ê.', '--onnx', {exported!r}, '--out', {str(out)!r},"
            " '--noise_scale', '0', '--noise_scale_duration', '0'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "sys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    same_audio(wav(out), torch_says(tiny_model_dir, "Ez 25 salî me, Wan’ê."))
    # The rate reaches the graph too.
    fast = quiet(None, "Ez 25 salî me, Wan’ê.", tmp_path, "--onnx", exported, "--speaking_rate", "0.5",
                 "--noise_scale", "0", "--noise_scale_duration", "0")
    same_audio(fast, torch_says(tiny_model_dir, "Ez 25 salî me, Wan’ê.", rate=0.5))


def test_a_speaker_id_as_large_as_the_number_of_speakers_is_refused(two_speaker_dir, tmp_path, capsys):
    # Speakers are numbered from 0: a voice of 2 has 0 and 1.
    assert run("Roj baş", "--model", two_speaker_dir, "--speaker_id", "2", "--out", tmp_path / "torch.wav") == 2
    assert "--speaker_id 2: this voice has speakers 0-1" in capsys.readouterr().err
    assert run("--model", two_speaker_dir, "--export_onnx", tmp_path / "voice") == 0
    assert run("Roj baş", "--onnx", tmp_path / "voice", "--speaker_id", "2", "--out", tmp_path / "onnx.wav") == 2
    assert "--speaker_id 2: this voice has speakers 0-1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "torch.wav") and not os.path.exists(tmp_path / "onnx.wav")
    assert run("Roj baş", "--onnx", tmp_path / "voice", "--speaker_id", "1", "--out", tmp_path / "onnx.wav") == 0


def test_lines_csv_never_carries_a_raw_bar(tiny_model_dir, tmp_path):
    # | separates lines.csv's two fields: a line holding one would read back as another file and text.
    lines = tmp_path / "lines.txt"
    lines.write_text("Roj baş | ez baş im.\nEz|baş im.\n", encoding="utf-8")
    assert run("--file", lines, "--model", tiny_model_dir, "--out_dir", tmp_path / "out") == 0
    written = (tmp_path / "out" / "lines.csv").read_text(encoding="utf-8").splitlines()
    assert written == ["line_001.wav|Roj baş   ez baş im.", "line_002.wav|Ez baş im."]


def test_the_exported_voice_speaks_at_the_rate_it_was_exported_with(tiny_model_dir, tmp_path):
    # The settings given to --export_onnx are the graph's defaults: a rate of 0.5 is a length scale of 2.
    out = tmp_path / "slow"
    assert run("--model", tiny_model_dir, "--export_onnx", out, "--speaking_rate", "0.5", "--noise_scale", "0",
               "--noise_scale_duration", "0") == 0
    assert onnx_voice.OnnxVoice(str(out / "model.onnx")).defaults == dict(noise_scale=0.0, noise_scale_w=0.0,
                                                                          length_scale=2.0)
    said = quiet(None, EVERY_LETTER[3], tmp_path, "--onnx", out)  # no speaking flags: the export's own
    same_audio(said, torch_says(tiny_model_dir, EVERY_LETTER[3], rate=0.5))


def test_the_exports_check_is_relative_to_the_clips_peak(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A quiet voice's graph may differ by no more than a thousandth of its own peak: an absolute limit would let
    a quiet voice's graph say something else entirely."""
    model, tokenizer = speaking.load(tiny_model_dir)
    with torch.no_grad():
        model.decoder.conv_post.weight.mul_(1e-3)  # the same voice, far quieter (tanh is linear near 0)
    voice = str(tmp_path / "quiet")
    model.save_pretrained(voice)
    tokenizer.save_pretrained(voice)
    peak = float(np.abs(torch_says(voice, EVERY_LETTER[3])).max())
    assert peak < 0.05
    real_run = onnx_voice.OnnxVoice.run

    def off_by(share):
        def run_off(self, ids, **scales):
            got = real_run(self, ids, **scales).copy()
            loudest = int(np.abs(got).argmax())
            got[loudest] += np.sign(got[loudest]) * share * onnx_voice.MAX_DIFFERENCE * np.abs(got).max()
            return got
        return run_off

    monkeypatch.setattr(onnx_voice.OnnxVoice, "run", off_by(2.0))
    assert run("--model", voice, "--export_onnx", tmp_path / "voice") == 2
    assert "differs from the torch voice by 0.002 of the peak" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "voice")
    monkeypatch.setattr(onnx_voice.OnnxVoice, "run", off_by(0.5))
    assert run("--model", voice, "--export_onnx", tmp_path / "voice") == 0


def test_the_export_says_its_own_line_without_the_tracers_warnings(tiny_model_dir, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run("--model", tiny_model_dir, "--export_onnx", tmp_path / "voice") == 0
        warnings.warn("after the export", torch.jit.TracerWarning)  # silenced during the export only
    said = [(w.category.__name__, str(w.message).split(".")[0]) for w in caught
            if issubclass(w.category, torch.jit.TracerWarning) or "Constant folding" in str(w.message)]
    assert said == [("TracerWarning", "after the export")]
    assert capsys.readouterr().out == (f"wrote {tmp_path / 'voice' / 'model.onnx'} + tokens.txt + README.md (the graph "
                                       "says what the torch voice says on every letter of its vocabulary)\n")
