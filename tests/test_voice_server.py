"""speak.py --serve: the current voice served to apps through the real openai client and a Wyoming client,
numbers read as words, a promote and a rollback followed without a restart, malformed requests refused with
one line, on this machine only; on the tiny model."""

import asyncio
import http.client
import io
import json
import os
import shutil
import socket
import tempfile
import threading

import numpy as np
import openai
import pytest
import soundfile as sf

import speak
import train_feedback as tf
from voicetune.voice import voice_server
from conftest import fake_run, free_port, wyoming_talk


def start(data_dir, *flags):
    """speak.py --serve on a free port in a thread; (base url, Wyoming port)."""
    ready = threading.Event()
    found = {}

    def on_ready(server, wyoming_port):
        found.update(server=server, url=server.url.rstrip("/"), wyoming=wyoming_port)
        ready.set()

    args = speak.parse_args(["--serve", "--data_dir", data_dir, "--port", "0", *flags])
    threading.Thread(target=voice_server.serve, args=(args, on_ready), daemon=True).start()
    assert ready.wait(120)
    return found


@pytest.fixture(scope="module")
def served(trained_voice, tmp_path_factory):
    """A data folder whose current voice is the night's, a finished run of another voice, and the server."""
    root = tmp_path_factory.mktemp("served")
    night = shutil.copytree(trained_voice, root / "data" / "final_model")
    run = fake_run(str(root / "run"), str(night), "keep", 1)
    found = start(str(root / "data"), "--wyoming_port", str(free_port()))
    yield dict(found, data=str(root / "data"), run=run)
    found["server"].shutdown()


def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="not-needed", max_retries=0)


def speech(served, text, **fields):
    audio = client(served).audio.speech.create(model="tts-1", voice="default", input=text, **fields).content
    samples, rate = sf.read(io.BytesIO(audio), dtype="float32")
    assert rate == 16000
    return samples


def torch_says(folder, text):
    """speak.py with the voice in `folder`, seed 0: what the server must answer for `text`."""
    with tempfile.TemporaryDirectory() as out:
        assert speak.main([text, "--model", str(folder), "--out", os.path.join(out, "said.wav")]) == 0
        return sf.read(os.path.join(out, "said.wav"), dtype="float32")[0]


def test_the_openai_client_gets_a_wav_of_the_current_voice_and_numbers_as_words(served):
    words = speech(served, "Ez bîst û pênc salî me.")
    digits = speech(served, "Ez 25 salî me.")
    assert np.array_equal(words, digits) and len(words) > 1000
    assert np.array_equal(words, torch_says(served["data"] + "/final_model", "Ez bîst û pênc salî me."))


def test_models_and_voices_are_listed_as_openai_and_kokoro_list_them(served):
    assert "tts-1" in [m.id for m in client(served).models.list()]
    status, body = request(served, "GET", "/v1/audio/voices")
    assert status == 200 and json.loads(body) == {"voices": ["default"]}


def test_after_a_promote_and_a_rollback_the_next_request_speaks_that_voice_without_a_restart(served):
    night = speech(served, "Roj baş.")
    assert tf.main(["--promote", served["run"], "--data_dir", served["data"]]) == 0
    promoted = speech(served, "Roj baş.")
    assert not np.array_equal(night, promoted)
    assert np.array_equal(promoted, torch_says(served["data"] + "/voice", "Roj baş."))
    assert tf.main(["--rollback", "--data_dir", served["data"]]) == 0
    assert np.array_equal(speech(served, "Roj baş."), night)


def test_a_wyoming_client_gets_the_voice(served):
    from wyoming.audio import AudioChunk
    from wyoming.info import Describe, Info
    from wyoming.tts import Synthesize

    [info] = asyncio.run(wyoming_talk(served["wyoming"], [Describe().event()]))
    assert Info.from_event(info).tts[0].voices[0].languages == ["ku_TR"]
    answers = asyncio.run(wyoming_talk(served["wyoming"], [Synthesize("Ez 25 salî me.").event()]))
    audio = b"".join(AudioChunk.from_event(e).audio for e in answers if e.type == "audio-chunk")
    said = np.frombuffer(audio, dtype=np.int16).astype(np.float32) / 32768
    assert answers[-1].type == "audio-stop"
    assert np.allclose(said, speech(served, "Ez bîst û pênc salî me.", response_format="wav"), atol=1 / 32768)


def request(served, method, path, body=None, headers=None):
    host, port = served["url"].split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    answer = connection.getresponse()
    return answer.status, answer.read()


@pytest.mark.parametrize("body,status", [
    (b"not json", 400), (b"[1, 2]", 400), (json.dumps({"voice": "default"}).encode(), 400),
    (json.dumps({"input": "Roj baş.", "response_format": "mp4"}).encode(), 400),
    (json.dumps({"input": "Roj baş.", "speed": 9}).encode(), 400),
    (json.dumps({"input": "Roj baş.", "speed": "fast"}).encode(), 400),
    (json.dumps({"input": "Привет мир"}).encode(), 400),
    (json.dumps({"input": "a" * (voice_server.MAX_INPUT_CHARS + 1)}).encode(), 413),
    (b"{" * 50 + b"}" * 50, 400),
])
def test_malformed_requests_get_a_4xx_of_one_line(served, body, status):
    got, answer = request(served, "POST", "/v1/audio/speech", body, {"Content-Type": "application/json"})
    assert got == status
    assert b"\n" not in answer and "error" in json.loads(answer)


def test_other_sites_and_other_methods_are_refused(served):
    assert request(served, "POST", "/v1/audio/speech", b"{}", {"Origin": "http://evil.example"})[0] == 403
    assert request(served, "GET", "/v1/audio/speech")[0] == 405
    assert request(served, "GET", "/v1/nothing")[0] == 404


def test_nothing_answers_on_another_interface_by_default(served):
    bound = served["server"].server_address[0]
    assert bound == "127.0.0.1"
    outside = socket.gethostbyname(socket.gethostname())
    if outside.startswith("127."):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outward interface
            except OSError:
                pytest.skip("this machine has no interface but loopback")
            outside = s.getsockname()[0]
    for port in (served["server"].server_address[1], served["wyoming"]):
        with pytest.raises(OSError):
            socket.create_connection((outside, port), 2).close()
