"""What the listening server refuses: a take by its decoded size (channels x rate x seconds), not by its
seconds alone; a correction text above its length limit; and, serving the network, a request whose Host
does not name this machine, tested on addresses every system has (0.0.0.0 and 127.0.0.1)."""

import http.client
import io
import json
import socket
import threading

import numpy as np
import pytest
import soundfile as sf

import listening
import speech
from examples.make_release import espeak_clip


def silent_flac(channels, rate, seconds):
    """A FLAC of silence: a few kB that decode to channels x rate x seconds samples."""
    buffer = io.BytesIO()
    block = np.zeros((rate, channels), np.int16)
    with sf.SoundFile(buffer, "w", rate, channels, "PCM_16", format="FLAC") as f:
        for _ in range(seconds):
            f.write(block)
    return buffer.getvalue()


def upload_status(data):
    try:
        listening.decode_upload(data, 16000)
    except listening.UploadError as err:
        return err.status, str(err)
    return 200, ""


def test_a_take_is_capped_by_its_decoded_size_not_its_seconds_alone():
    # The cap: a minute of 96 kHz stereo, 60 x 96,000 x 2 samples.
    cap = 60 * 96_000 * 2
    # 31 s of 8-channel 48 kHz audio: half a minute, but 11.9 million samples.
    assert 31 * 48_000 * 8 > cap
    status, message = upload_status(silent_flac(8, 48_000, 31))
    assert status == 413 and "once decoded" in message
    # Within the cap it is decoded, and refused only as the silence it is.
    status, message = upload_status(silent_flac(8, 48_000, 5))
    assert status == 422 and "silent" in message
    # A minute of 96 kHz stereo is exactly the cap; one frame more, or one channel more, is past it.
    listening.refuse_long_take(60 * 96_000, 96_000, 2)
    for frames, channels in ((60 * 96_000 + 1, 2), (41 * 96_000, 3)):
        with pytest.raises(listening.UploadError):
            listening.refuse_long_take(frames, 96_000, channels)


class Server:
    """A listening server over a one-sentence session, bound to `host` (any free port), in a thread."""

    def __init__(self, host, tmp_path, vocab, allowed=()):
        rows = [dict(id="s000", text="Roj baş.", mark=None, saved=None)]
        self.session = listening.Session(str(tmp_path / "session"), str(tmp_path / "feedback"), "voice", rows,
                                         16000, vocab)
        (tmp_path / "session").mkdir(exist_ok=True)
        self.server = listening.make_server(self.session, host, 0, allowed)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ask(self, method, path, host, origin=None, body=b""):
        """(status, JSON answer) of a request to 127.0.0.1 naming `host` in its Host header."""
        headers = {"Host": host, **({"Origin": origin} if origin else {})}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body if method == "POST" else None, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def vocab(tiny_model_dir):
    return speech.load_vocab(tiny_model_dir)[1]


def test_a_correction_text_above_its_length_limit_is_refused(tmp_path, vocab):
    served = Server("127.0.0.1", tmp_path, vocab)
    take = io.BytesIO()
    sf.write(take, espeak_clip("Roj baş, hevalno.", 16000), 16000, format="WAV")
    host = f"127.0.0.1:{served.port}"
    try:
        status, answer = served.ask("POST", "/api/save/0?text=" + "a" * 1001, host, body=take.getvalue())
        assert status == 400 and answer["error"] == "text longer than 1000 characters"
        assert not (tmp_path / "feedback").exists()
        # 1000 characters are within the limit (a run of spaces counts as one).
        status, answer = served.ask("POST", "/api/save/0?text=" + "a" * 998 + "%20%20%20b", host,
                                    body=take.getvalue())
        assert status == 200, answer
        assert (tmp_path / "feedback" / "audio_001.txt").read_text(encoding="utf-8") == "a" * 998 + " b\n"
    finally:
        served.close()


def test_serving_the_network_answers_only_requests_that_name_this_machine(tmp_path, vocab):
    served = Server("0.0.0.0", tmp_path, vocab, allowed=("Voice.LAN",))
    port = served.port
    try:
        # A DNS-rebinding page sends its own domain as Host and as Origin: both agree, and it is refused.
        for host in [f"evil.example:{port}", "evil.example", f"voice.lan.evil.example:{port}", f"{port}", ""]:
            status, answer = served.ask("POST", "/api/mark/0", host, f"http://{host}", b'{"mark": "good"}')
            assert status == 403 and "must name this machine" in answer["error"], host
            assert served.ask("GET", "/api/session", host)[0] == 403, host
        assert served.session.rows[0]["mark"] is None
        # The names of this machine: any address, localhost, its names and --allowed_host (any case, with a
        # trailing dot).
        for host in [f"127.0.0.1:{port}", f"0.0.0.0:{port}", f"192.168.1.5:{port}", f"[::1]:{port}", "localhost",
                     f"{socket.gethostname()}:{port}", f"{socket.getfqdn()}:{port}", f"voice.lan:{port}",
                     f"VOICE.lan.:{port}"]:
            assert served.ask("GET", "/api/session", host)[0] == 200, host
        # Another site's page posting to an allowed name is still cross-origin.
        status, _ = served.ask("POST", "/api/mark/0", f"voice.lan:{port}", "http://evil.example", b'{"mark": "good"}')
        assert status == 403
        status, state = served.ask("POST", "/api/mark/0", f"voice.lan:{port}", f"http://voice.lan:{port}",
                                   b'{"mark": "good"}')
        assert status == 200 and state["rows"][0]["mark"] == "good"
    finally:
        served.close()
    # Bound to this machine only, only its local names are answered.
    served = Server("127.0.0.1", tmp_path, vocab)
    try:
        for host, status in [(f"127.0.0.1:{served.port}", 200), ("localhost", 200), (f"[::1]:{served.port}", 200),
                             (f"192.168.1.5:{served.port}", 403), (socket.gethostname(), 403)]:
            assert served.ask("GET", "/api/session", host)[0] == status, host
    finally:
        served.close()
