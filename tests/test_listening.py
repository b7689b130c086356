"""train_feedback.py --listen: the page, the voice's audio, corrections saved as WAV + TXT pairs, refusals
(a take by its decoded size, a text by its length, a Host that does not name this machine), resume, and one
real take recorded by headless Chromium."""

import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
import unicodedata

import librosa
import numpy as np
import pytest
import soundfile as sf

from voicetune.common import page_server
from voicetune.common import run_files
from voicetune.common import speech
from voicetune.feedback import feedback_flags
from voicetune.feedback import listening
import train_feedback as tf
from examples.make_release import SENTENCES, espeak_clip
from conftest import chromium, raw_request, Served

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
LISTENED = [SENTENCES[0], "Ew $25 e.", SENTENCES[1]]  # the line with a sign it has no reading for is left out


def wav_bytes(audio, sr, fmt="WAV", subtype=None):
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture
def session(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """A new session from a sentence file, served; a feedback folder where the app already wrote audio_007."""
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(LISTENED) + "\n", encoding="utf-8")
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    (feedback / "audio_007.wav").write_bytes(wav_bytes(np.zeros(1600), 16000))
    (feedback / "audio_007.txt").write_text("roj baş\n", encoding="utf-8")
    folder = str(tmp_path / "session")
    argv = ["--listen", str(sentences), "--model", tiny_model_dir, "--feedback_dir", str(feedback),
            "--output_dir", folder, "--port", "0", "--device", "cpu"]
    served = Served(argv, monkeypatch)
    yield served, folder, str(feedback), argv
    if served.thread.is_alive():
        served.stop()


def test_page_and_voice_audio_are_served(session, capsys):
    served, folder, feedback, _ = session
    status, page = served.request("GET", "/")
    assert status == 200 and b"<title>Listening session</title>" in page
    assert b"http://" not in page and b"https://" not in page  # offline: nothing fetched from elsewhere
    status, data = served.request("GET", "/api/session")
    state = json.loads(data)
    assert [r["text"] for r in state["rows"]] == [LISTENED[0], LISTENED[2]]
    assert (state["heard"], state["total"], state["corrections"]) == (0, 2, 0)
    # The app's audio_007 is in the feedback folder already: the run would train on it, and hold none out.
    assert state["outlook"] == ("1 recorded: none held out to judge the tune, so the verdict cannot judge it and "
                                "would reject it: record 3 more to have 1 held out (one recording in ten is, at "
                                "least one from 4); to be sure (p < 0.05) it needs 6 held-out clips that agree: 59 "
                                "more recordings")
    assert state["command"] == (f"{run_files.interpreter()} train_feedback.py --model {served_model(folder)} "
                                f"--feedback_dir {feedback}")
    for i, row in enumerate(state["rows"]):
        status, audio = served.request("GET", f"/audio/{i}.wav")
        with open(os.path.join(folder, "model", f"{row['id']}.wav"), "rb") as f:
            assert status == 200 and audio == f.read()
        samples, sr = sf.read(io.BytesIO(audio))
        assert sr == 16000 and samples.size > 0
    served.stop()
    printed = capsys.readouterr().out
    assert "left out (unreadable_number): Ew $25 e." in printed
    assert f"open http://127.0.0.1:{served.port}/" in printed
    assert f"0 of 2 heard, 0 corrections in {feedback}" in printed


def test_a_sentence_with_digits_is_spoken_and_the_page_shows_its_words(tiny_model_dir, tmp_path, monkeypatch):
    """Kurmanji numbers are read as words on the page as everywhere: "25" is said, and shown, as bîst û pênc."""
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("Ez 25 salî me.\n", encoding="utf-8")
    served = Served(["--listen", str(sentences), "--model", tiny_model_dir, "--feedback_dir", str(tmp_path / "fb"),
                     "--output_dir", str(tmp_path / "session"), "--port", "0", "--device", "cpu"], monkeypatch)
    try:
        state = json.loads(served.request("GET", "/api/session")[1])
        page = served.request("GET", "/")[1]
    finally:
        served.stop()
    assert [(r["text"], r.get("reads")) for r in state["rows"]] == [("Ez 25 salî me.", "ez bîst û pênc salî me")]
    assert b"the voice reads: " in page


def served_model(folder):
    with open(os.path.join(folder, listening.SESSION_FILE), encoding="utf-8") as f:
        return json.load(f)["voice"]


def test_the_kits_readme_names_the_folder_the_page_saves_into(session, capsys):
    served, folder, feedback, _ = session
    tuner = run_files.command_line(run_files.interpreter(), run_files.script("train_feedback.py"))
    state = json.loads(served.request("GET", "/api/session")[1])
    served.stop()
    with open(os.path.join(folder, "README.txt"), encoding="utf-8") as f:
        readme = f.read()
    model = served_model(folder)
    assert state["feedback_dir"] == feedback
    assert (f"With the listening page, which saves each correction into {feedback}:\n"
            f"1. {tuner} --listen {folder} --model {model} --feedback_dir {feedback}\n") in readme
    assert f"\n2. {state['command']}\n\nOr by hand, with any recording app, into this folder:\n" in readme
    assert readme.endswith(f"\n3. {tuner} --model {model} --feedback_dir {folder}\n")
    assert (f"session kit: 2 sentences in {folder} (README.txt says how to record: with the listening page into "
            f"{feedback}, or by hand into {folder})\n") in capsys.readouterr().out


def test_the_shipped_sentence_file_is_spoken_whole_and_holds_every_kurmanji_letter(tiny_model_dir, tmp_path, capsys):
    """examples/sentences.txt, what a first --listen is offered: every line a sentence the voice can say (its
    numbers read as words), every letter of the Kurmanji alphabet in it."""
    path = os.path.join(ROOT, run_files.SENTENCES)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kit = str(tmp_path / "kit")
    assert tf.main(["--make_session", path, "--model", tiny_model_dir, "--output_dir", kit, "--device", "cpu"]) == 0
    assert "left out" not in capsys.readouterr().out
    assert listening.kit_sentences(kit) == [(f"s{i:03d}", line) for i, line in enumerate(lines, 1)]
    assert set("abcçdeêfghiîjklmnopqrsştuûvwxyz") <= set(" ".join(lines).lower())
    _, vocab = speech.load_vocab(tiny_model_dir)
    numbers = [speech.clean_text(line, vocab)[0] for line in lines if any(ch.isdigit() for ch in line)]
    assert numbers and not any(ch.isdigit() for text in numbers for ch in text)


def test_recordings_are_saved_as_16k_pcm_pairs_and_a_redo_replaces_its_take(session):
    served, folder, feedback, _ = session
    take = espeak_clip(SENTENCES[0], 48000, stereo=True)  # what a browser records: 48 kHz, maybe stereo
    status, state = served.save(0, wav_bytes(take, 48000, subtype="FLOAT"), "  Roj baş,   hevalno! ")
    assert status == 200, state
    # Numbered after the app's own audio_007; text as typed, whitespace collapsed.
    wav = os.path.join(feedback, "audio_008.wav")
    assert state["saved"] == wav
    info = sf.info(wav)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    expected = librosa.resample(take.mean(axis=1), orig_sr=48000, target_sr=16000)
    saved, _ = sf.read(wav, dtype="float32")
    assert len(saved) == len(expected)
    np.testing.assert_allclose(saved, np.clip(expected, -1, 1), atol=1.5 / 32768)
    with open(os.path.join(feedback, "audio_008.txt"), encoding="utf-8") as f:
        assert f.read() == "Roj baş, hevalno!\n"
    assert state["rows"][0]["mark"] == "needs_work" and (state["heard"], state["corrections"]) == (1, 1)

    # Ogg/Opus, as Firefox's MediaRecorder sends it, for the second sentence.
    status, state = served.save(1, wav_bytes(espeak_clip(SENTENCES[1], 48000), 48000, "OGG", "OPUS"), SENTENCES[1],
                                "audio/ogg")
    assert status == 200 and state["saved"] == os.path.join(feedback, "audio_009.wav")
    assert sf.info(state["saved"]).samplerate == 16000

    # Redo of the first sentence: the same pair is replaced, nothing added.
    redo = espeak_clip(SENTENCES[2], 16000)
    status, state = served.save(0, wav_bytes(redo, 16000), SENTENCES[2])
    assert status == 200 and state["saved"] == wav
    np.testing.assert_allclose(sf.read(wav, dtype="float32")[0], redo, atol=1 / 32768)
    assert sorted(os.listdir(feedback)) == ["audio_007.txt", "audio_007.wav", "audio_008.txt", "audio_008.wav",
                                            "audio_009.txt", "audio_009.wav"]
    status, audio = served.request("GET", "/recorded/0.wav")
    with open(wav, "rb") as f:
        assert status == 200 and audio == f.read()
    assert state["outlook"].startswith("3 recorded: none held out to judge the tune")
    # A fourth pair, from the recording app: one is held out now, and the page says how little it can tell.
    with open(os.path.join(feedback, "audio_010.wav"), "wb") as f:
        f.write(wav_bytes(redo, 16000))
    with open(os.path.join(feedback, "audio_010.txt"), "w", encoding="utf-8") as f:
        f.write(SENTENCES[3] + "\n")
    assert json.loads(served.request("GET", "/api/session")[1])["outlook"] == (
        "4 recorded: 1 held out to judge the tune; with 1 clip the verdict can at best be p = 1; to be sure "
        "(p < 0.05) it needs 6 held-out clips that agree: 56 more recordings")


def test_bad_uploads_and_requests_are_refused(session, monkeypatch):
    served, folder, feedback, _ = session
    before = sorted(os.listdir(feedback)), sorted(os.listdir(folder))
    speech = wav_bytes(espeak_clip(SENTENCES[0], 16000), 16000)

    monkeypatch.setattr(listening, "MAX_UPLOAD_BYTES", len(speech) - 1)
    status, answer = served.save(0, speech, SENTENCES[0])
    assert status == 413 and "larger than" in answer["error"]
    monkeypatch.setattr(listening, "MAX_UPLOAD_BYTES", 20 * 2**20)

    status, answer = served.save(0, b"this is not audio at all" * 100, SENTENCES[0])
    assert status == 415 and "not audio" in answer["error"]
    status, answer = served.save(0, listening.WEBM_MAGIC + b"\x00" * 500, SENTENCES[0], "audio/webm")
    assert status == 415 and "WebM" in answer["error"]
    status, answer = served.save(0, wav_bytes(np.zeros(16000), 16000), SENTENCES[0])
    assert status == 422 and "silent" in answer["error"]
    status, answer = served.save(0, speech, "Ew $25 e.")
    assert status == 422 and "unreadable_number" in answer["error"]

    # Paths are never taken from the request.
    for method, path in [("POST", "/api/save/../../evil"), ("POST", "/api/save/7"), ("GET", "/audio/..%2Fsession.json"),
                         ("GET", "/audio/../session.json"), ("GET", "/audio/5.wav"), ("GET", "/recorded/0.wav"),
                         ("GET", "/session.json"), ("POST", "/api/mark/9")]:
        status, _ = served.request(method, path, speech if method == "POST" else None)
        assert status == 404, path
    # Another site's page, or a rebound domain name, gets nothing.
    status, _ = served.request("POST", "/api/mark/0", b'{"mark": "good"}', {"Origin": "http://evil.example"})
    assert status == 403
    status, _ = served.request("GET", "/api/session", headers={"Host": "evil.example:80"})
    assert status == 403
    status, _ = served.request("POST", "/api/mark/0", b'{"mark": "bad"}')
    assert status == 400
    assert (sorted(os.listdir(feedback)), sorted(os.listdir(folder))) == before

    # A text that looks like a path is only text: the name is still ours.
    status, answer = served.save(0, speech, "../../../etc/passwd")
    assert status == 200 and answer["saved"] == os.path.join(feedback, "audio_008.wav")
    assert sorted(os.listdir(feedback)) == before[0] + ["audio_008.txt", "audio_008.wav"]


def test_a_session_resumes_from_session_json(session, monkeypatch, capsys):
    served, folder, feedback, argv = session
    served.request("POST", "/api/mark/1", b'{"mark": "good"}')
    status, state = served.save(0, wav_bytes(espeak_clip(SENTENCES[0], 16000), 16000), "Roj baş, hevalno!")
    assert status == 200
    served.stop()
    voice_audio = {f: os.stat(os.path.join(folder, "model", f)).st_mtime_ns for f in os.listdir(os.path.join(folder, "model"))}

    # --listen with no value continues the newest session under training/sessions.
    monkeypatch.chdir(os.path.dirname(folder))
    moved = os.path.join("training", "sessions", "2026-11-25")
    shutil.move(folder, moved)
    capsys.readouterr()
    # (Served on every address this time, and a metadata.csv appears beside the pairs: both are warned about.)
    with open(os.path.join(feedback, "metadata.csv"), "w", encoding="utf-8") as f:
        f.write("other.wav|roj baş\n")
    resumed = Served(["--listen", "--model", argv[3], "--feedback_dir", feedback, "--port", "0",
                      "--host", "0.0.0.0", "--allow_remote"], monkeypatch)
    status, data = resumed.request("GET", "/api/session")
    state = json.loads(data)
    assert [(r["mark"], r["text"], r["saved"]) for r in state["rows"]] == [
        ("needs_work", "Roj baş, hevalno!", os.path.join(feedback, "audio_008.wav")), ("good", SENTENCES[1], None)]
    assert (state["heard"], state["total"], state["corrections"]) == (2, 2, 1)
    printed = capsys.readouterr().out
    assert f"listening session: 2 sentences in {moved} (2 of 2 heard, 1 correction so far)" in printed
    assert "warning: --host 0.0.0.0 lets other machines" in printed
    assert f"warning: {feedback} holds a metadata.csv" in printed
    # The voice's audio is not made again, and a redo after resuming replaces the same pair.
    assert {f: os.stat(os.path.join(moved, "model", f)).st_mtime_ns for f in voice_audio} == voice_audio
    status, answer = resumed.save(0, wav_bytes(espeak_clip(SENTENCES[3], 16000), 16000), SENTENCES[3])
    assert answer["saved"] == os.path.join(feedback, "audio_008.wav")
    resumed.stop()

    # Another voice speaks the sentences again; the marks stay.
    other_voice = shutil.copytree(argv[3], "other_voice")
    args = tf.parse_args(["--listen", moved, "--model", other_voice, "--feedback_dir", feedback, "--device", "cpu"])
    again = listening.open_session(moved, args)
    assert all(os.stat(os.path.join(moved, "model", f)).st_mtime_ns != t for f, t in voice_audio.items())
    assert [r["mark"] for r in again.rows] == ["needs_work", "good"] and again.voice == other_voice


def test_listening_beyond_this_machine_needs_a_flag(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tf.parse_args(["--listen", str(tmp_path), "--model", tiny_model_dir, "--host", "0.0.0.0"])
    assert "--allow_remote" in capsys.readouterr().err
    args = tf.parse_args(["--listen", str(tmp_path), "--model", tiny_model_dir, "--host", "0.0.0.0", "--allow_remote"])
    assert args.host == "0.0.0.0" and args.output_dir == str(tmp_path)


def raw_bytes(port, data, half_close=False, wait_s=30):
    """Send `data` as it is on a socket; return all the server answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def json_answer(answer):
    """(status, headers, JSON body) of a raw HTTP answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "application/json", answer[:300]
    return int(lines[0].split()[1]), headers, json.loads(body)


def tone(seconds, sr, start=0.0, total=None):
    """A 440 Hz tone of `seconds` at `start` in `total` seconds of digital silence (default: just the tone)."""
    audio = np.zeros(round((total or seconds) * sr), dtype=np.float32)
    n = round(seconds * sr)
    audio[round(start * sr):round(start * sr) + n] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / sr)
    return audio


def test_a_take_that_decodes_past_a_minute_is_refused_before_it_is_decoded(session, monkeypatch):
    served, folder, feedback, _ = session
    before = sorted(os.listdir(feedback))
    decoded = []  # frames soundfile handed out, for whoever asked (the checks or speech.load_audio)
    read = sf.SoundFile.read

    def counting_read(self, *args, **kwargs):
        out = read(self, *args, **kwargs)
        decoded.append(len(out))
        return out

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    # Small uploads that decode to far more than a minute: 90 s of FLAC, 30 minutes of 8-bit 100 Hz WAV.
    flac = wav_bytes(tone(1.0, 8000, total=90), 8000, "FLAC", "PCM_16")
    u8 = wav_bytes(np.zeros(100 * 1800), 100, "WAV", "PCM_U8")
    assert len(flac) < 100_000 and len(u8) < 200_000
    for bomb in (flac, u8):
        status, answer = served.save(0, bomb, SENTENCES[0])
        assert status == 413 and "longer than 60 s" in answer["error"], answer
        assert sum(decoded) == 0  # refused from the header, before a single block was decoded
    # A header that understates the length (as an estimated one can): decoding stops one block past the minute.
    info = sf.info

    def understated(file):
        real = info(file)
        real.frames = real.samplerate
        return real

    monkeypatch.setattr(sf, "info", understated)
    status, answer = served.save(0, flac, SENTENCES[0])
    assert status == 413 and "longer than 60 s" in answer["error"], answer
    assert 60 * 8000 < sum(decoded) <= 60 * 8000 + listening.DECODE_BLOCK_FRAMES
    assert sorted(os.listdir(feedback)) == before
    monkeypatch.setattr(sf, "info", info)
    # A 59 s take is still a take.
    status, answer = served.save(0, wav_bytes(tone(1.0, 8000, total=59), 8000, "FLAC", "PCM_16"), SENTENCES[0])
    assert status == 200 and sf.info(answer["saved"]).duration == pytest.approx(59)


def test_remote_mode_answers_only_names_of_this_machine(session, monkeypatch, tiny_model_dir, capsys):
    served, folder, feedback, _ = session
    try:
        socket.create_server(("127.0.0.2", 0)).close()
    except OSError as err:
        pytest.skip(f"127.0.0.2 is not on this machine's loopback ({err})")
    served.stop()
    # 127.0.0.2 is on loopback but not a local name: the server runs as with --host 0.0.0.0.
    remote = Served(["--listen", folder, "--model", tiny_model_dir, "--feedback_dir", feedback, "--port", "0",
                     "--host", "127.0.0.2", "--allow_remote", "--allowed_host", "Voice.LAN", "--device", "cpu"],
                    monkeypatch)
    try:
        port = remote.port
        assert "answering only requests that name this machine" in capsys.readouterr().out

        def ask(method, path, host, origin=None, body=b""):
            headers = [("Host", host)] + ([("Origin", origin)] if origin else [])
            if method == "POST":
                headers.append(("Content-Length", str(len(body))))
            return raw_request(port, method, path, headers, body, address="127.0.0.2")[::2]

        # A DNS-rebinding page sends its own domain as Host and as Origin: both agree, and it is refused.
        for host in [f"evil.example:{port}", "evil.example", f"voice.lan.evil.example:{port}", f"{port}", ""]:
            status, answer = ask("POST", "/api/mark/0", host, f"http://{host}", b'{"mark": "good"}')
            assert status == 403 and "must name this machine" in answer["error"], host
            assert ask("GET", "/api/session", host)[0] == 403
        with open(os.path.join(folder, listening.SESSION_FILE), encoding="utf-8") as f:
            assert [r["mark"] for r in json.load(f)["sentences"]] == [None, None]
        # The names of this machine are answered: the bound address, any address, localhost, the machine's
        # names and --allowed_host (case and a trailing dot do not matter).
        for host in [f"127.0.0.2:{port}", f"192.168.1.5:{port}", f"[::1]:{port}", "localhost",
                     f"{socket.gethostname()}:{port}", f"{socket.getfqdn()}:{port}", f"voice.lan:{port}",
                     f"VOICE.lan.:{port}"]:
            assert ask("GET", "/api/session", host)[0] == 200, host
        status, state = ask("POST", "/api/mark/1", f"voice.lan:{port}", f"http://voice.lan:{port}", b'{"mark": "good"}')
        assert status == 200 and state["rows"][1]["mark"] == "good"
        # Another site's page posting to an allowed name is still cross-origin.
        status, _ = ask("POST", "/api/mark/0", f"voice.lan:{port}", "http://evil.example", b'{"mark": "good"}')
        assert status == 403
    finally:
        remote.stop()
    # --allowed_host is a host name, and only means something with --allow_remote.
    for extra, error in [(["--allowed_host", "voice.lan"], "it needs --allow_remote"),
                         (["--host", "0.0.0.0", "--allow_remote", "--allowed_host", "http://voice.lan"], "host name"),
                         (["--host", "0.0.0.0", "--allow_remote", "--allowed_host", "voice.lan:80"], "host name")]:
        with pytest.raises(SystemExit):
            tf.parse_args(["--listen", folder, "--model", tiny_model_dir] + extra)
        assert error in capsys.readouterr().err
    helps = {a.dest: a.help for a in feedback_flags.build_parser(tf.__doc__)._actions}
    assert "DNS rebinding" in helps["allow_remote"] and "no password" in helps["allow_remote"]


def test_a_number_is_never_given_twice(session, monkeypatch, tiny_model_dir, tmp_path):
    served, folder, feedback, _ = session
    speech = wav_bytes(espeak_clip(SENTENCES[0], 16000), 16000)
    moved = tmp_path / "moved"
    moved.mkdir()
    status, answer = served.save(0, speech, SENTENCES[0])
    assert status == 200 and answer["saved"] == os.path.join(feedback, "audio_008.wav")
    # The speaker moves the new pair away (to check it, or to another folder): 008 stays used.
    for ext in ("wav", "txt"):
        shutil.move(os.path.join(feedback, f"audio_008.{ext}"), moved)
    status, answer = served.save(1, speech, SENTENCES[1])
    assert status == 200 and answer["saved"] == os.path.join(feedback, "audio_009.wav")
    for ext in ("wav", "txt"):
        shutil.move(os.path.join(feedback, f"audio_009.{ext}"), moved)
    served.stop()
    with open(os.path.join(folder, listening.SESSION_FILE), encoding="utf-8") as f:
        assert json.load(f)["last_number"] == 9
    # After a restart too: a redo of a sentence whose pair is gone is a new pair, numbered after 009.
    resumed = Served(["--listen", folder, "--model", tiny_model_dir, "--feedback_dir", feedback, "--port", "0",
                      "--device", "cpu"], monkeypatch)
    status, answer = resumed.save(0, speech, SENTENCES[0])
    assert status == 200 and answer["saved"] == os.path.join(feedback, "audio_010.wav")
    resumed.stop()
    assert sorted(os.listdir(feedback)) == ["audio_007.txt", "audio_007.wav", "audio_010.txt", "audio_010.wav"]


def test_every_malformed_request_gets_a_json_4xx(session, capsys):
    served, folder, feedback, _ = session
    port = served.port
    host = ("Host", f"127.0.0.1:{port}")
    before = sorted(os.listdir(feedback)), sorted(os.listdir(folder))
    digits = "7" * 5000
    mark = b'{"mark": "good"}'
    cases = [
        ("GET", f"/audio/{digits}.wav", [], b"", 404),
        ("GET", f"/recorded/{digits}.wav", [], b"", 404),
        ("POST", f"/api/mark/{digits}", [("Content-Length", "16")], mark, 404),
        ("POST", f"/api/save/{digits}?text=roj", [("Content-Length", "16")], mark, 404),
        ("POST", "/api/mark/0", [("Content-Length", "1024")], b"[" * 1024, 400),  # deeper than json can recurse
        ("POST", "/api/mark/0", [("Content-Length", "20")], b'{"mark": [[[["x"]]]]}'[:20], 400),
        ("POST", "/api/mark/0", [("Content-Length", "100000")], b"", 413),  # refused before its body is sent
        ("POST", "/api/mark/0", [("Content-Length", "6")], b'"good"', 400),
        ("POST", "/api/mark/0", [("Content-Length", "4")], b"\xff\xfe{}", 400),
        ("POST", "/api/mark/0", [("Content-Length", "\u00b2")], b"", 400),  # ² is a digit to str.isdigit
        ("POST", "/api/mark/0", [("Content-Length", "1\u00b3")], b"", 400),
        ("POST", "/api/mark/0", [("Content-Length", digits)], b"", 413),
        ("POST", "/api/save/0?text=roj", [("Content-Length", digits)], b"", 413),
        ("POST", "/api/mark/0", [("Content-Length", "-16")], b"", 400),
        ("POST", "/api/mark/0", [("Content-Length", "0x10")], b"", 400),
        ("POST", "/api/mark/0", [("Content-Length", "16"), ("Content-Length", "17")], mark, 400),
        ("POST", "/api/mark/0", [], b"", 411),
        ("POST", "/api/save/0?text=roj", [], b"", 411),
        ("GET", "/nowhere", [], b"", 404),
        ("POST", "/nowhere", [("Content-Length", "0")], b"", 404),
        ("GET", "/api/mark/0", [], b"", 405),
        ("POST", "/api/session", [("Content-Length", "0")], b"", 405),
        ("PUT", "/api/mark/0", [("Content-Length", "16")], mark, 405),
        ("DELETE", "/api/session", [], b"", 405),
        ("OPTIONS", "/api/save/0", [], b"", 405),
        ("PATCH", "/", [], b"", 405),
        ("BREW", "/", [], b"", 405),
    ]
    for method, path, headers, body, expected in cases:
        status, response, answer = raw_request(port, method, path, [host] + headers, body)
        assert status == expected and isinstance(answer, dict) and answer["error"], (method, path[:40], headers[:1],
                                                                                    status, answer)
    status, response, answer = raw_request(port, "HEAD", "/", [host])
    assert status == 405 and answer == {} and response.getheader("Allow") == "GET, POST"
    # What http.client will not send: a space in the path, a header line past http.server's limit, a body
    # shorter than its Content-Length.
    for data, half_close, expected in [
            (b"GET /a b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", False, 400),
            (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * (65537 - 8), False, 431),  # (all of it read: no reset)
            (b"POST /api/mark/0 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n" + mark, True, 400)]:
        status, _, answer = json_answer(raw_bytes(port, data, half_close))
        assert status == expected and answer["error"], (data[:40], status, answer)
    # Nothing was written, nothing was raised, and the server still answers.
    assert (sorted(os.listdir(feedback)), sorted(os.listdir(folder))) == before
    with open(os.path.join(folder, listening.SESSION_FILE), encoding="utf-8") as f:
        assert [r["mark"] for r in json.load(f)["sentences"]] == [None, None]
    assert served.request("GET", "/api/session")[0] == 200
    assert "Traceback" not in capsys.readouterr().err


def test_no_answer_can_be_framed_by_another_site(session):
    served, _, _, _ = session
    port = served.port
    host = ("Host", f"127.0.0.1:{port}")
    answers = [raw_request(port, method, path, headers, body)[1] for method, path, headers, body in [
        ("GET", "/", [host], b""), ("GET", "/api/session", [host], b""), ("GET", "/audio/0.wav", [host], b""),
        ("GET", "/nowhere", [host], b""),
        ("POST", "/api/mark/0", [host, ("Content-Length", "16")], b'{"mark": "good"}'),
        ("PUT", "/", [host], b""), ("GET", "/", [("Host", "evil.example")], b"")]]
    assert [a.status for a in answers] == [200, 200, 200, 404, 200, 405, 403]
    for response in answers:
        assert response.getheader("X-Frame-Options") == "DENY"
        assert response.getheader("Content-Security-Policy") == "frame-ancestors 'none'"
    _, headers, _ = json_answer(raw_bytes(port, b"GET /a b HTTP/1.1\r\n\r\n"))
    assert headers["X-Frame-Options"] == "DENY" and headers["Content-Security-Policy"] == "frame-ancestors 'none'"


def test_control_characters_never_reach_the_terminal_or_the_txt(session, capsys):
    served, folder, feedback, _ = session
    speech = wav_bytes(espeak_clip(SENTENCES[0], 16000), 16000)
    capsys.readouterr()
    typed = "\x1bc\u202eRoj\x1b baş,\x00 heval\u200bno!\x07\r\n\x7f\u2066"
    status, answer = served.save(0, speech, typed)
    assert status == 200, answer
    with open(answer["saved"][:-4] + ".txt", encoding="utf-8") as f:
        assert f.read() == "cRoj baş, hevalno!\n"
    assert answer["rows"][0]["text"] == "cRoj baş, hevalno!"
    printed = capsys.readouterr().out
    assert "cRoj baş, hevalno!" in printed
    assert not any(unicodedata.category(ch) in ("Cc", "Cf") for ch in printed.replace("\n", ""))
    # A text that is nothing but control characters is no text.
    status, answer = served.save(1, speech, "\x1b\x00\u200b")
    assert status == 422 and "empty_text" in answer["error"]


def test_a_client_that_sends_nothing_is_dropped(session, monkeypatch):
    served, _, _, _ = session
    assert 10 <= page_server.READ_TIMEOUT_S <= 30
    monkeypatch.setattr(page_server, "READ_TIMEOUT_S", 1)
    started = time.monotonic()
    # A body announced and never sent: the read times out and the connection is answered and closed.
    answer = raw_bytes(served.port, f"POST /api/mark/0 HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n"
                                    "Content-Length: 100\r\n\r\n".encode(), wait_s=10)
    status, _, error = json_answer(answer)
    assert status == 408 and "did not arrive" in error["error"]
    # Headers never finished, or nothing sent at all: the connection is closed.
    assert raw_bytes(served.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n", wait_s=10) == b""
    assert raw_bytes(served.port, b"", wait_s=10) == b""
    assert time.monotonic() - started < 10
    assert served.request("GET", "/api/session")[0] == 200


def test_a_take_shorter_than_a_third_of_a_second_is_refused(session):
    served, folder, feedback, _ = session
    before = sorted(os.listdir(feedback))
    # 0.05 s of sound, alone or between 1 s of silence on each side (trimmed as the trainer trims clips).
    for take in (tone(0.05, 16000), tone(0.05, 48000, start=1.0, total=2.05)):
        status, answer = served.save(0, wav_bytes(take, 16000 if len(take) < 16000 else 48000), SENTENCES[0])
        assert status == 422 and "at least 0.3 s" in answer["error"], answer
    assert sorted(os.listdir(feedback)) == before
    status, answer = served.save(0, wav_bytes(tone(0.4, 48000, start=1.0, total=2.4), 48000), SENTENCES[0])
    assert status == 200, answer


def test_a_take_recorded_in_headless_chromium_lands_as_a_pair(session, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    served, folder, feedback, _ = session
    capture = tmp_path / "microphone.wav"
    sf.write(capture, espeak_clip(SENTENCES[4], 48000), 48000, subtype="PCM_16")
    browser = chromium(tmp_path, capture)
    try:
        browser.get(f"http://127.0.0.1:{served.port}/")
        wait = WebDriverWait(browser, 60)
        row = wait.until(lambda b: b.find_element(By.ID, "row-0"))
        row.find_element(By.CSS_SELECTOR, ".needs-work").click()
        wait.until(lambda b: row.find_element(By.CSS_SELECTOR, ".record").is_displayed())
        text = row.find_element(By.CSS_SELECTOR, ".text")
        text.clear()
        text.send_keys(SENTENCES[4])
        row.find_element(By.CSS_SELECTOR, ".record").click()
        # Stop once the page has taken in 1.5 s of microphone audio (the fake device loops the file).
        length = row.find_element(By.CSS_SELECTOR, ".length")
        wait.until(lambda b: length.text.startswith("recording") and float(length.text.split()[1]) >= 1.5)
        row.find_element(By.CSS_SELECTOR, ".stop").click()
        wait.until(lambda b: row.find_element(By.CSS_SELECTOR, ".save").is_enabled())
        row.find_element(By.CSS_SELECTOR, ".save").click()
        status = row.find_element(By.CSS_SELECTOR, ".status")
        wait.until(lambda b: status.text.startswith("saved as") or "error" in status.text)
        assert status.text == "saved as audio_008.wav"
        assert browser.find_element(By.ID, "progress").text == "1 of 2 heard, 1 correction"
        assert browser.find_element(By.ID, "outlook").text == (
            "2 recorded: none held out to judge the tune, so the verdict cannot judge it and would reject it: record "
            "2 more to have 1 held out (one recording in ten is, at least one from 4); to be sure (p < 0.05) it "
            "needs 6 held-out clips that agree: 58 more recordings")
    finally:
        browser.quit()
    info = sf.info(os.path.join(feedback, "audio_008.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert info.duration >= 1.5
    audio, _ = sf.read(os.path.join(feedback, "audio_008.wav"))
    assert np.abs(audio).max() > 0.05  # the espeak speech arrived, not silence
    with open(os.path.join(feedback, "audio_008.txt"), encoding="utf-8") as f:
        assert f.read() == SENTENCES[4] + "\n"


# ---------------------------------- the decoded-size cap, the text limit, the Host check on 0.0.0.0

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
    except page_server.UploadError as err:
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
        with pytest.raises(page_server.UploadError):
            listening.refuse_long_take(frames, 96_000, channels)


class Server:
    """A listening server over a one-sentence session, bound to `host` (any free port), in a thread."""

    def __init__(self, host, tmp_path, vocab, allowed=()):
        rows = [dict(id="s000", text="Roj baş.", mark=None, saved=None)]
        self.session = listening.Session(str(tmp_path / "session"), str(tmp_path / "feedback"), "voice", rows,
                                         16000, vocab)
        (tmp_path / "session").mkdir(exist_ok=True)
        self.server = page_server.make_server(listening.Handler, self.session, host, 0, allowed)
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
