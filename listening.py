"""The listening-session page of `train_feedback.py --listen`: hear the voice sentence by sentence, mark
each one good or needs work, record how it should sound and save it straight into the feedback folder as
an `audio_NNN.wav` + `audio_NNN.txt` pair, the layout the user's recording app writes.

The server is the standard library's ThreadingHTTPServer: one listener on one machine sends a few requests
a minute, so a web framework would add a dependency and nothing else. The page (listen_page.html) records
16-bit PCM WAV with Web Audio rather than MediaRecorder, whose Chromium output (WebM/Opus) libsndfile
cannot decode; the server still takes anything soundfile reads (WAV, FLAC, Ogg Vorbis/Opus, MP3).
"""

import io
import json
import os
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from transformers import VitsConfig

import distributed
import models
import run_errors
import run_folder
import speech
import voice_quality

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "listen_page.html")
SESSION_FILE = "session.json"
MAX_UPLOAD_BYTES = 20 * 2**20  # ~3.5 minutes of 48 kHz 16-bit mono: far longer than any sentence
MAX_TEXT_CHARS = 1000
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MARKS = ("good", "needs_work")
WEBM_MAGIC = b"\x1a\x45\xdf\xa3"  # EBML header: Chromium's MediaRecorder output


class UploadError(ValueError):
    """A request the session refuses; `status` is the HTTP status it answers with."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------------
# The session: sentences, the voice's audio of each, the listener's marks and saved corrections.

class Session:
    """Rows of {id, text, mark, saved} kept in FOLDER/session.json; the voice's audio in FOLDER/model/<id>.wav.

    Every change is written to session.json at once, so closing the page (or the server) loses nothing.
    """

    def __init__(self, folder, feedback_dir, voice, rows, sampling_rate, vocab):
        self.folder, self.feedback_dir, self.voice = folder, feedback_dir, voice
        self.rows, self.sampling_rate, self.vocab = rows, sampling_rate, vocab
        self.lock = threading.Lock()

    def voice_audio(self, index):
        return os.path.join(self.folder, "model", f"{self.row(index)['id']}.wav")

    def recording(self, index):
        """The saved correction of row `index`, when it is still in this session's feedback folder."""
        saved = self.row(index)["saved"]
        if saved and os.path.dirname(os.path.abspath(saved)) == os.path.abspath(self.feedback_dir):
            return saved if os.path.isfile(saved) else None
        return None

    def row(self, index):
        if not 0 <= index < len(self.rows):
            raise UploadError(HTTPStatus.NOT_FOUND, f"no sentence {index}")
        return self.rows[index]

    def state(self):
        heard = sum(r["mark"] is not None for r in self.rows)
        corrections = sum(r["saved"] is not None for r in self.rows)
        return dict(rows=self.rows, heard=heard, total=len(self.rows), corrections=corrections,
                    progress=f"{heard} of {len(self.rows)} heard, {corrections} correction{'s' * (corrections != 1)}",
                    feedback_dir=self.feedback_dir, command=train_command(self.voice, self.feedback_dir))

    def mark(self, index, mark):
        if mark not in MARKS:
            raise UploadError(HTTPStatus.BAD_REQUEST, f"mark must be one of {', '.join(MARKS)}")
        with self.lock:
            self.row(index)["mark"] = mark
            self.write()

    def save_correction(self, index, data, text):
        """Decode the upload, write NAME.wav (16-bit PCM at the voice's rate) + NAME.txt; return NAME.wav's path."""
        row = self.row(index)
        text = " ".join(text.split())
        if len(text) > MAX_TEXT_CHARS:
            raise UploadError(HTTPStatus.BAD_REQUEST, f"text longer than {MAX_TEXT_CHARS} characters")
        _, reason = speech.clean_text(text, self.vocab)
        if reason:
            raise UploadError(HTTPStatus.UNPROCESSABLE_ENTITY, f"the voice cannot learn this text ({reason}): "
                                                               "write numbers as words, use the Latin alphabet")
        audio = decode_upload(data, self.sampling_rate)
        with self.lock:
            # A redo replaces this sentence's earlier correction instead of adding a second one.
            wav = self.recording(index) or next_free_name(self.feedback_dir)
            os.makedirs(self.feedback_dir, exist_ok=True)
            speech.write_wav(wav, audio, self.sampling_rate)
            run_folder.write_atomically(os.path.splitext(wav)[0] + ".txt", text + "\n", durable=False)
            row.update(mark="needs_work", text=text, saved=wav)
            self.write()
        print(f"saved {wav} ({len(audio) / self.sampling_rate:.1f} s): {text}")
        return wav

    def write(self):
        data = dict(voice=self.voice, feedback_dir=self.feedback_dir, sentences=self.rows)
        run_folder.write_atomically(os.path.join(self.folder, SESSION_FILE),
                                    json.dumps(data, indent=2, ensure_ascii=False), durable=False)


def decode_upload(data, sampling_rate):
    """Whatever the browser sent, as float32 mono at the voice's rate; UploadError when it is not usable speech."""
    if data.startswith(WEBM_MAGIC):
        raise UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          "WebM audio cannot be decoded without ffmpeg: send WAV, FLAC, Ogg or MP3")
    try:
        audio = speech.load_audio(io.BytesIO(data), sampling_rate)
    except speech.AudioError as err:
        raise UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"not audio soundfile can read ({err})") from None
    if speech.is_silent(audio):
        raise UploadError(HTTPStatus.UNPROCESSABLE_ENTITY, "the recording is silent: check the microphone")
    return audio


def next_free_name(feedback_dir):
    """feedback_dir/audio_NNN.wav, one past the highest number already there (as the recording app counts)."""
    numbers = [int(m.group(1)) for f in (os.listdir(feedback_dir) if os.path.isdir(feedback_dir) else [])
               if (m := re.fullmatch(r"audio_(\d+)\.\w+", f))]
    return os.path.join(feedback_dir, f"audio_{max(numbers, default=0) + 1:03d}.wav")


def train_command(voice, feedback_dir):
    quoted = [f'"{a}"' if " " in a else a for a in (voice, feedback_dir)]
    return f"python train_feedback.py --model {quoted[0]} --feedback_dir {quoted[1]}"


# ----------------------------------------------------------------------------------------------------
# Opening a session: from session.json when there is one, else from a --make_session kit.

def kit_sentences(folder):
    """(id, text) of each sentence of a --make_session kit: sNNN.txt beside the voice's model/sNNN.wav."""
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(folder)
                 if f.endswith(".txt") and os.path.isfile(os.path.join(folder, "model", f[:-4] + ".wav")))
    if not ids:
        raise run_errors.TrainingError(f"--listen {folder}: no {SESSION_FILE} and no sNNN.txt + model/sNNN.wav "
                                       "sentences (give a sentence file or a --make_session kit)")
    sentences = []
    for i in ids:
        with open(os.path.join(folder, i + ".txt"), encoding="utf-8-sig") as f:
            sentences.append((i, " ".join(f.read().split())))
    return sentences


def open_session(folder, args):
    """The session in `folder`, its voice audio made with --model wherever it is missing or from another voice."""
    _, vocab = speech.load_vocab(args.model)
    path = os.path.join(folder, SESSION_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            rows, voice = saved["sentences"], saved["voice"]
        except (ValueError, KeyError, TypeError) as err:
            raise run_errors.TrainingError(f"{path}: not a listening session ({err}); move it away to start "
                                           "afresh") from None
    else:
        rows = [dict(id=i, text=t, mark=None, saved=None) for i, t in kit_sentences(folder)]
        voice = args.model  # --make_session spoke the kit with the voice given now
    # Ids name files in model/: never a path.
    bad = [r["id"] for r in rows if not re.fullmatch(r"[\w.-]+", r["id"]) or r["id"].strip(".") == ""]
    if bad:
        raise run_errors.TrainingError(f"{path}: sentence ids must be plain names, got {bad[:3]}")
    speakable = []
    for r in rows:
        text, reason = speech.clean_text(r["text"], vocab)
        if reason:
            print(f"left out ({reason}): {r['text']}")
        else:
            speakable.append((r, text))
    if not speakable:
        raise run_errors.TrainingError(f"--listen {folder}: no sentence the voice can say")
    rows = [r for r, _ in speakable]
    stale = [(r, t) for r, t in speakable
             if voice != args.model or not os.path.isfile(os.path.join(folder, "model", f"{r['id']}.wav"))]
    if stale:
        speak(stale, folder, args)
    session = Session(folder, args.feedback_dir, args.model, rows,
                      VitsConfig.from_pretrained(args.model).sampling_rate, vocab)
    with session.lock:
        session.write()
    return session


def speak(rows_and_texts, folder, args):
    """The voice speaks each sentence once into FOLDER/model/<id>.wav (the page's cache)."""
    print(f"speaking {len(rows_and_texts)} sentences with {args.model} ...")
    model, tokenizer = models.load_voice(args.model)
    model.to(distributed.resolve_device(args.device))
    model_dir = os.path.join(folder, "model")
    paths = voice_quality.synthesise(model, tokenizer, [t for _, t in rows_and_texts], os.path.join(model_dir, ".new"))
    for path, (row, _) in zip(paths, rows_and_texts):
        os.replace(path, os.path.join(model_dir, f"{row['id']}.wav"))
    os.rmdir(os.path.join(model_dir, ".new"))


# ----------------------------------------------------------------------------------------------------
# HTTP: the page, the session as JSON, audio by row number, marks and uploads. No path from a request
# is ever joined to a folder: rows are addressed by number and every file name is the session's own.

class Handler(BaseHTTPRequestHandler):
    session = None  # set by make_server
    local = True  # bound to this machine only: then only a local Host header is answered

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.answer(self.route_get)

    def do_POST(self):  # noqa: N802
        self.answer(self.route_post)

    def answer(self, route):
        try:
            self.check_origin()
            route(urlsplit(self.path))
        except UploadError as err:
            self.send_json(dict(error=str(err)), err.status)

    def route_get(self, url):
        if url.path == "/":
            with open(PAGE, "rb") as f:
                self.send_bytes(f.read(), "text/html; charset=utf-8")
        elif url.path == "/api/session":
            self.send_json(self.session.state())
        elif m := re.fullmatch(r"/audio/(\d+)\.wav", url.path):
            self.send_file(self.session.voice_audio(int(m.group(1))))
        elif m := re.fullmatch(r"/recorded/(\d+)\.wav", url.path):
            self.send_file(self.session.recording(int(m.group(1))))
        else:
            raise UploadError(HTTPStatus.NOT_FOUND, "not found")

    def check_origin(self):
        """Refuse what another web site's page makes the browser send here: cross-origin posts, and requests
        through a domain name that was re-pointed at 127.0.0.1 (DNS rebinding)."""
        host = self.headers.get("Host", "")
        if self.local and host.rsplit(":", 1)[0].strip("[]") not in LOCAL_HOSTS:
            raise UploadError(HTTPStatus.FORBIDDEN, "requests must name this machine (localhost)")
        if self.headers.get("Origin") not in (None, f"http://{host}"):
            raise UploadError(HTTPStatus.FORBIDDEN, "cross-origin request refused")

    def route_post(self, url):
        if m := re.fullmatch(r"/api/mark/(\d+)", url.path):
            self.session.row(int(m.group(1)))
            try:
                mark = json.loads(self.read_body() or b"{}").get("mark")
            except (ValueError, AttributeError):
                raise UploadError(HTTPStatus.BAD_REQUEST, 'body must be JSON {"mark": ...}') from None
            self.session.mark(int(m.group(1)), mark)
            self.send_json(self.session.state())
        elif m := re.fullmatch(r"/api/save/(\d+)", url.path):
            index = int(m.group(1))
            self.session.row(index)
            text = parse_qs(url.query).get("text", [""])[0]
            wav = self.session.save_correction(index, self.read_body(), text)
            self.send_json(dict(self.session.state(), saved=wav))
        else:
            raise UploadError(HTTPStatus.NOT_FOUND, "not found")

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise UploadError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        if int(length) > MAX_UPLOAD_BYTES:
            raise UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"upload larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
        return self.rfile.read(int(length))

    def send_file(self, path):
        if path is None or not os.path.isfile(path):
            raise UploadError(HTTPStatus.NOT_FOUND, "no such audio")
        with open(path, "rb") as f:
            self.send_bytes(f.read(), "audio/wav")

    def send_json(self, data, status=HTTPStatus.OK):
        self.send_bytes(json.dumps(data, ensure_ascii=False).encode(), "application/json", status)

    def send_bytes(self, body, content_type, status=HTTPStatus.OK):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a redo must never play the old take
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        pass  # saves are printed by the session; one line per request would bury them


def make_server(session, host, port):
    """A ThreadingHTTPServer serving `session` (port 0: any free port); the caller runs serve_forever."""
    handler = type("SessionHandler", (Handler,), dict(session=session, local=host in LOCAL_HOSTS))
    server_class = type("Server", (ThreadingHTTPServer,), dict(address_family=socket.AF_INET6)) if ":" in host \
        else ThreadingHTTPServer
    server = server_class((host, port), handler)
    server.url = f"http://{f'[{host}]' if ':' in host else host}:{server.server_address[1]}/"
    return server


def serve(folder, args):
    """Open the session in `folder` and serve its page until Ctrl-C; then print what to run next."""
    session = open_session(folder, args)
    server = make_server(session, args.host, args.port)
    if args.host not in LOCAL_HOSTS:
        print(f"warning: --host {args.host} lets other machines on the network open this page and write into "
              f"{session.feedback_dir}; browsers only allow the microphone on localhost or over https")
    print(f"listening session: {len(session.rows)} sentences in {folder} ({session.state()['progress']} so far); "
          f"corrections go to {session.feedback_dir}")
    if os.path.isfile(os.path.join(session.feedback_dir, "metadata.csv")):
        print(f"warning: {session.feedback_dir} holds a metadata.csv, which train_feedback.py reads instead of "
              "the audio_NNN.wav + .txt pairs saved here: use another --feedback_dir")
    print(f"open {server.url} in a browser (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    state = session.state()
    print(f"{state['progress']} in {session.feedback_dir}; resume with: python train_feedback.py --listen {folder}")
    print(f"train on them with: {state['command']}")
