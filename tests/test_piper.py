"""speak.py --export_piper: the piper voice that piper, wyoming-piper (Home Assistant) and sherpa-onnx load from the
one .onnx, speaking Kurmanji's letters, capitals and apostrophes as the torch voice does, on the tiny model."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import sherpa_onnx
import torch
from piper import PiperVoice
from piper.config import SynthesisConfig
from transformers import VitsModel

import speak
from examples.tiny_model import make_tokenizer, tiny_config
from voicetune.common import speech
from voicetune.voice import piper_voice
from voicetune.voice import speaking
from conftest import free_port, wyoming_talk

HOP = 256  # the tiny model's upsampling: 8 * 8 * 2 * 2
NAME = "ku_TR-dilan-low"
# Every Kurmanji letter with a mark, its capital, typographic apostrophes and punctuation, as users type them.
SENTENCES = ["Şêr û çiya", "ÇÊÎŞÛ çêîşû", "Wan’ê û Qur’an", "Şêr, û çiya li Wan’ê ne.", "Îro êvarê"]
ZERO = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=1.0, normalize_audio=False)


def torch_says(model_dir, text, speaker_id=None):
    model, tokenizer = speaking.load(model_dir, noise_scale=0.0, noise_scale_duration=0.0)
    cleaned, reason = speech.clean_text(text, speech.load_vocab(model_dir)[1])
    assert reason is None
    return speaking.say(model, tokenizer, cleaned, speaker_id)


def piper_says(voice, text, speaker_id=None):
    """piper's own path, text to audio (NFD, its frame ids, the graph)."""
    config = SynthesisConfig(speaker_id=speaker_id, noise_scale=0.0, noise_w_scale=0.0, length_scale=1.0,
                             normalize_audio=False)
    return np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(text, config)])


def assert_speaks_like(got, expected):
    assert abs(len(got) - len(expected)) <= HOP
    n = min(len(got), len(expected))
    assert np.corrcoef(got[:n], expected[:n])[0, 1] >= 0.999


@pytest.fixture(scope="module")
def piper_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("piper")
    (out / "other-voice.txt").write_text("another voice's file")
    assert speak.main(["--model", tiny_model_dir, "--export_piper", str(out), "--voice_name", "Dilan",
                       "--data_licence", "Common Voice, CC0-1.0"]) == 0
    return out


@pytest.fixture(scope="module")
def two_speaker_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("two_speakers"))
    torch.manual_seed(1)
    config = tiny_config(len(make_tokenizer(out)))
    config.num_speakers, config.speaker_embedding_size = 2, 16
    VitsModel(config).save_pretrained(out)
    return out


def test_piper_speaks_every_kurmanji_letter_as_the_torch_voice_does(piper_dir, tiny_model_dir):
    voice = PiperVoice.load(str(piper_dir / f"{NAME}.onnx"))
    for sentence in SENTENCES:
        assert_speaks_like(piper_says(voice, sentence), torch_says(tiny_model_dir, sentence))
    # Without the marks folded in, "Şêr û çiya" would be spoken "Ser u ciya": not what piper says.
    naive = torch_says(tiny_model_dir, "Ser u ciya")
    said = piper_says(voice, "Şêr û çiya")
    n = min(len(said), len(naive))
    assert len(said) != len(naive) or np.corrcoef(said[:n], naive[:n])[0, 1] < 0.99


def test_the_voice_config_is_what_piper_and_wyoming_piper_read(piper_dir):
    config = json.loads((piper_dir / f"{NAME}.onnx.json").read_text(encoding="utf-8"))
    assert config["dataset"] == NAME and config["phoneme_type"] == "text"
    assert config["language"]["code"] == "ku_TR" and config["audio"] == {"sample_rate": 16000, "quality": "low"}
    ids = config["phoneme_id_map"]
    assert ids["_"] == [0] and ids["^"] == [1] and ids["$"] == [2]
    assert ids["Ş"] == ids["ş"] and ids["’"] == ids["'"] and "\u0327" in ids and "\u0302" in ids
    assert config["inference"] == {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8}
    card = (piper_dir / f"{NAME}.md").read_text(encoding="utf-8")
    assert "CC-BY-NC-4.0" in card and "Common Voice, CC0-1.0" in card
    assert (piper_dir / "other-voice.txt").read_text() == "another voice's file"


def test_sherpa_onnx_runs_the_same_file(piper_dir, tiny_model_dir):
    vits = sherpa_onnx.OfflineTtsVitsModelConfig(model=str(piper_dir / f"{NAME}.onnx"),
                                                 tokens=str(piper_dir / f"{NAME}.tokens.txt"),
                                                 noise_scale=0.0, noise_scale_w=0.0, length_scale=1.0)
    tts = sherpa_onnx.OfflineTts(sherpa_onnx.OfflineTtsConfig(
        model=sherpa_onnx.OfflineTtsModelConfig(vits=vits, num_threads=1), silence_scale=1.0))
    for sentence in ["Şêr û çiya", "ÇÊÎŞÛ çêîşû", "Wan’ê û Qur’an"]:
        assert_speaks_like(np.array(tts.generate(sentence, sid=0).samples), torch_says(tiny_model_dir, sentence))


def test_each_speaker_of_a_multi_speaker_voice_is_named_and_spoken(two_speaker_dir, tmp_path):
    assert speak.main(["--model", two_speaker_dir, "--export_piper", str(tmp_path), "--voice_name", "two"]) == 0
    config = json.loads((tmp_path / "ku_TR-two-low.onnx.json").read_text(encoding="utf-8"))
    assert config["num_speakers"] == 2 and config["speaker_id_map"] == {"speaker_0": 0, "speaker_1": 1}
    voice = PiperVoice.load(str(tmp_path / "ku_TR-two-low.onnx"))
    for sid in (0, 1):
        assert_speaks_like(piper_says(voice, "Şêr û çiya", sid), torch_says(two_speaker_dir, "Şêr û çiya", sid))


def test_a_piper_voice_that_differs_from_torch_is_not_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # A front end that forgets to fold the marks: piper would say "Ser" for "Şêr".
    monkeypatch.setattr(piper_voice, "fold_table", lambda tokenizer, marks: np.tile(
        np.arange(piper_voice.vocab_size(tokenizer))[:, None], (1, len(marks) + 1)))
    assert speak.main(["--model", tiny_model_dir, "--export_piper", str(tmp_path), "--voice_name", "x"]) != 0
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: --export_piper") and "piper says" in err and err.endswith("not written")
    assert os.listdir(tmp_path) == []


def wyoming_ready(port, process, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the Wyoming server did not start")


def test_wyoming_piper_advertises_the_voice_under_ku_tr_and_speaks_it(piper_dir, tiny_model_dir):
    from wyoming.audio import AudioChunk
    from wyoming.info import Describe, Info
    from wyoming.tts import Synthesize, SynthesizeVoice

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "wyoming_piper", "--voice", NAME, "--data-dir", str(piper_dir),
                                "--uri", f"tcp://127.0.0.1:{port}", "--noise-scale", "0", "--noise-w-scale", "0",
                                "--length-scale", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wyoming_ready(port, process)
        [info] = asyncio.run(wyoming_talk(port, [Describe().event()]))
        voices = {v.name: v for v in Info.from_event(info).tts[0].voices}
        assert voices[NAME].languages == ["ku_TR"]
        answers = asyncio.run(wyoming_talk(port, [Synthesize("Şêr û çiya", voice=SynthesizeVoice(name=NAME)).event()]))
        audio = b"".join(AudioChunk.from_event(e).audio for e in answers if e.type == "audio-chunk")
        said = np.frombuffer(audio, dtype=np.int16).astype(np.float32)
        assert_speaks_like(said, torch_says(tiny_model_dir, "Şêr û çiya"))
    finally:
        process.terminate()
        process.wait(10)
