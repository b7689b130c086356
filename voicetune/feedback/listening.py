"""The listening session of `train_feedback.py --make_session` and `--listen`: the kit (the voice's audio of
each sentence and its text), and the page that serves it: hear the voice sentence by sentence, mark
each one good or needs work, record how it should sound and save it straight into the feedback folder as
an `audio_NNN.wav` + `audio_NNN.txt` pair, the layout the user's recording app writes.

The server is the standard library's ThreadingHTTPServer: one listener on one machine sends a few requests
a minute, so a web framework would add a dependency and nothing else. The page (listen_page.html) records
16-bit PCM WAV with Web Audio rather than MediaRecorder, whose Chromium output (WebM/Opus) libsndfile
cannot decode; the server still takes anything soundfile reads (WAV, FLAC, Ogg Vorbis/Opus, MP3).
"""

import glob
import io
import ipaddress
import json
import os
import re
import socket
import threading
import time
import unicodedata
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import soundfile as sf
from transformers import VitsConfig

from voicetune.common import distributed
from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.voice import speakers
from voicetune.common import speech
from voicetune.voice import speaking
from voicetune.voice import speak_lines

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "listen_page.html")
SESSION_FILE = "session.json"
MAX_UPLOAD_BYTES = 20 * 2**20  # ~3.5 minutes of 48 kHz 16-bit mono: far longer than any sentence
# The decoded take, whatever its upload size: a compressed file (FLAC of silence, an 8-bit 100 Hz WAV) can
# hold hours. Checked from the file's header before decoding, and again block by block while decoding.
MAX_TAKE_SECONDS = 60
MAX_TAKE_SAMPLES = MAX_TAKE_SECONDS * 96000 * 2  # a minute of 96 kHz stereo: ~46 MB as float32
MIN_TAKE_SECONDS = 0.3  # of sound, after trimming silence as train_feedback.py trims its clips
DECODE_BLOCK_FRAMES = 65536
MAX_TEXT_CHARS = 1000
MAX_JSON_BYTES = 1024  # a mark is {"mark": "needs_work"}
MAX_JSON_DEPTH = 4
MAX_INDEX_DIGITS = 9  # row numbers in paths, and the digits of a Content-Length
READ_TIMEOUT_S = 20  # a client that announces a body and sends none is dropped after this long
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
AUDIO_NAME = re.compile(r"audio_([0-9]{1,%d})\.\w+" % MAX_INDEX_DIGITS)  # the recording app's audio_NNN pairs
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
    `last_number` is the highest audio_NNN this session ever saved: a pair moved out of the feedback folder
    never gives its number to another take.
    """

    def __init__(self, folder, feedback_dir, voice, rows, sampling_rate, vocab, last_number=0, speaker_id=None):
        self.folder, self.feedback_dir, self.voice, self.speaker_id = folder, feedback_dir, voice, speaker_id
        self.rows, self.sampling_rate, self.vocab = rows, sampling_rate, vocab
        self.last_number = max([last_number] + [saved_number(r["saved"]) for r in rows])
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
                    feedback_dir=self.feedback_dir,
                    command=run_files.tune_command(self.voice, self.feedback_dir, self.speaker_id))

    def mark(self, index, mark):
        if mark not in MARKS:
            raise UploadError(HTTPStatus.BAD_REQUEST, f"mark must be one of {', '.join(MARKS)}")
        with self.lock:
            self.row(index)["mark"] = mark
            self.write()

    def save_correction(self, index, data, text):
        """Decode the upload, write NAME.wav (16-bit PCM at the voice's rate) + NAME.txt; return NAME.wav's path."""
        row = self.row(index)
        text = plain_text(text)
        if len(text) > MAX_TEXT_CHARS:
            raise UploadError(HTTPStatus.BAD_REQUEST, f"text longer than {MAX_TEXT_CHARS} characters")
        _, reason = speech.clean_text(text, self.vocab)
        if reason:
            raise UploadError(HTTPStatus.UNPROCESSABLE_ENTITY, f"the voice cannot learn this text ({reason}): write "
                                                               "signs without a Kurmanji reading ($, °C, -5) as words, "
                                                               "use the Latin alphabet")
        audio = decode_upload(data, self.sampling_rate)
        with self.lock:
            # A redo replaces this sentence's earlier correction instead of adding a second one.
            wav = self.recording(index)
            if wav is None:
                self.last_number = next_number(self.feedback_dir, self.last_number)
                wav = os.path.join(self.feedback_dir, f"audio_{self.last_number:03d}.wav")
            os.makedirs(self.feedback_dir, exist_ok=True)
            speech.write_wav(wav, audio, self.sampling_rate)
            run_folder.write_atomically(os.path.splitext(wav)[0] + ".txt", text + "\n", durable=False)
            row.update(mark="needs_work", text=text, saved=wav)
            self.write()
        print(f"saved {wav} ({len(audio) / self.sampling_rate:.1f} s): {text}")
        return wav

    def write(self):
        data = dict(voice=self.voice, speaker_id=self.speaker_id, feedback_dir=self.feedback_dir,
                    last_number=self.last_number, sentences=self.rows)
        run_folder.write_atomically(os.path.join(self.folder, SESSION_FILE),
                                    json.dumps(data, indent=2, ensure_ascii=False), durable=False)


def decode_upload(data, sampling_rate):
    """Whatever the browser sent, as float32 mono at the voice's rate; UploadError when it is not usable speech."""
    if data.startswith(WEBM_MAGIC):
        raise UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          "WebM audio cannot be decoded without ffmpeg: send WAV, FLAC, Ogg or MP3")
    check_take_length(data)
    try:
        audio = speech.load_audio(io.BytesIO(data), sampling_rate)
    except speech.AudioError as err:
        raise UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"not audio soundfile can read ({err})") from None
    if speech.is_silent(audio):
        raise UploadError(HTTPStatus.UNPROCESSABLE_ENTITY, "the recording is silent: check the microphone")
    sound = len(speech.trim_silence(audio)) / sampling_rate
    if sound < MIN_TAKE_SECONDS:
        raise UploadError(HTTPStatus.UNPROCESSABLE_ENTITY, f"the take holds only {sound:.2f} s of sound (at least "
                                                           f"{MIN_TAKE_SECONDS} s): record the whole sentence")
    return audio


def check_take_length(data):
    """UploadError 413 for a take longer than MAX_TAKE_SECONDS or MAX_TAKE_SAMPLES once decoded: refused from
    its header before anything is decoded, else while decoding it block by block (keeping no block), so a
    small file that decodes to hours is never decoded whole. speech.load_audio then decodes a take known to fit."""
    try:
        info = sf.info(io.BytesIO(data))
        refuse_long_take(info.frames, info.samplerate, info.channels)  # frames is SF_COUNT_MAX when unknown
        with sf.SoundFile(io.BytesIO(data)) as f:
            decoded, block_frames = 0, max(1, DECODE_BLOCK_FRAMES // f.channels)
            while len(block := f.read(block_frames, dtype="float32", always_2d=True)):
                decoded += len(block)
                refuse_long_take(decoded, f.samplerate, f.channels)
    except UploadError:
        raise
    except Exception as err:  # noqa: BLE001 - libsndfile reports corrupt input with several exception types
        raise UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          f"not audio soundfile can read ({str(err).split(': ')[-1].strip()})") from None


def refuse_long_take(frames, samplerate, channels):
    if frames > MAX_TAKE_SECONDS * samplerate or frames * channels > MAX_TAKE_SAMPLES:
        raise UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"the take is longer than {MAX_TAKE_SECONDS} s once decoded (or holds more than "
                          f"{MAX_TAKE_SAMPLES} samples): record one sentence at a time")


def next_number(feedback_dir, after=0):
    """One past the highest audio_NNN already in feedback_dir (as the recording app counts) and past `after`."""
    numbers = [int(m.group(1)) for f in (os.listdir(feedback_dir) if os.path.isdir(feedback_dir) else [])
               if (m := AUDIO_NAME.fullmatch(f))]
    return max(numbers + [after]) + 1


def saved_number(path):
    """The NNN of a saved audio_NNN.wav path; 0 for none."""
    m = AUDIO_NAME.fullmatch(os.path.basename(path)) if isinstance(path, str) else None
    return int(m.group(1)) if m else 0


def plain_text(text):
    """`text` with every whitespace run as one space and control and format characters (Unicode Cc and Cf:
    ESC, NUL, bidi overrides, zero-width marks) removed: safe to print to a terminal and to write to a .txt."""
    kept = "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf"))
    return " ".join(kept.split())


# ----------------------------------------------------------------------------------------------------
# The session kit (--make_session): the voice's audio and the text of each sentence, read back below.

def make_session(args):
    """Speak every sentence of args.make_session with args.model into OUTPUT_DIR/model/sNNN.wav and write
    sNNN.txt: recordings saved as sNNN.wav beside them make the folder a feedback folder as it is."""
    with open(args.make_session, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    model, tokenizer = speaking.load(args.model)
    _, vocab = speech.load_vocab(args.model)
    speaker = speakers.feedback_speaker(model.config, speakers.read_table(args.model), args.speaker_id)
    model.to(distributed.resolve_device(args.device))
    rows, spoken, unspeakable = [], [], []
    for line in lines:
        text, reason = speech.clean_text(line, vocab)
        if reason:
            unspeakable.append((line, reason))
            continue
        name = f"s{len(rows) + 1:03d}"
        rows.append((f"{name}.wav", line))
        spoken.append(text)
    if not rows:
        raise run_errors.TrainingError(f"--make_session {args.make_session}: no sentence the voice can say")
    out = args.output_dir
    model_dir = os.path.join(out, "model")
    speak_lines.speak_files(speaking.TorchVoice(model, tokenizer, speaker, speaking.SAMPLE_MAX_SECONDS),
                            [(wav, text) for (wav, _), text in zip(rows, spoken)], model_dir)
    for wav, text in rows:
        with open(os.path.join(out, os.path.splitext(wav)[0] + ".txt"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
    with open(os.path.join(out, "README.txt"), "w", encoding="utf-8") as f:
        f.write(
            f"Listening session made {time.strftime('%Y-%m-%d %H:%M')} with {args.model}"
            + (f", speaker {speaker}" if speaker is not None else "") + ".\n\n"
            "1. Listen to model/sNNN.wav; sNNN.txt holds what each one should say.\n"
            "2. For every sentence the voice says badly, record it as it should sound and save it in this\n"
            "   folder as sNNN.wav, beside its sNNN.txt (another format such as sNNN.flac or sNNN.mp3 is\n"
            "   fine). Sentences you do not record are left out.\n"
            f"3. {run_files.tune_command(args.model, out, speaker)}\n")
    for line, reason in unspeakable:
        print(f"left out ({reason}): {line}")
    print(f"session kit: {len(rows)} sentences in {out} (listen to {model_dir}, record into {out}, "
          "see README.txt)")
    return out


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
            rows, voice, last_number = saved["sentences"], saved["voice"], saved.get("last_number", 0)
            spoken_by = saved.get("speaker_id")
            if not isinstance(last_number, int) or last_number < 0:
                raise ValueError(f"last_number {last_number!r}")
        except (ValueError, KeyError, TypeError) as err:
            raise run_errors.TrainingError(f"{path}: not a listening session ({err}); move it away to start "
                                           "afresh") from None
    else:
        rows = [dict(id=i, text=t, mark=None, saved=None) for i, t in kit_sentences(folder)]
        voice, last_number = args.model, 0  # --make_session spoke the kit with the voice given now
        spoken_by = "kit"
    # Ids name files in model/: never a path.
    bad = [r["id"] for r in rows if not re.fullmatch(r"[\w.-]+", r["id"]) or r["id"].strip(".") == ""]
    if bad:
        raise run_errors.TrainingError(f"{path}: sentence ids must be plain names, got {bad[:3]}")
    speakable = []
    for r in rows:
        text, reason = speech.clean_text(r["text"], vocab)
        if reason:
            print(f"left out ({reason}): {plain_text(r['text'])}")
        else:
            r["reads"] = text  # the words the voice says (numbers read out), shown on the page
            speakable.append((r, text))
    if not speakable:
        raise run_errors.TrainingError(f"--listen {folder}: no sentence the voice can say")
    rows = [r for r, _ in speakable]
    config = VitsConfig.from_pretrained(args.model)
    speaker = speakers.feedback_speaker(config, speakers.read_table(args.model), args.speaker_id)
    spoken_by = speaker if spoken_by == "kit" else spoken_by
    # Another voice or another of its speakers: every sentence is spoken again.
    stale = [(r, t) for r, t in speakable if voice != args.model or spoken_by != speaker
             or not os.path.isfile(os.path.join(folder, "model", f"{r['id']}.wav"))]
    if stale:
        speak(stale, folder, args, speaker)
    session = Session(folder, args.feedback_dir, args.model, rows, config.sampling_rate, vocab, last_number, speaker)
    with session.lock:
        session.write()
    return session


def speak(rows_and_texts, folder, args, speaker):
    """The voice (its speaker `speaker`) speaks each sentence once into FOLDER/model/<id>.wav (the page's cache)."""
    print(f"speaking {len(rows_and_texts)} sentences with {args.model}"
          + (f", speaker {speaker}" if speaker is not None else "") + " ...")
    voice = speaking.TorchVoice.load(args.model, speaker, args.device, speaking.SAMPLE_MAX_SECONDS)
    speak_lines.speak_files(voice, [(f"{row['id']}.wav", text) for row, text in rows_and_texts],
                            os.path.join(folder, "model"))


# ----------------------------------------------------------------------------------------------------
# HTTP: the page, the session as JSON, audio by row number, marks and uploads. No path from a request
# is ever joined to a folder: rows are addressed by number and every file name is the session's own.
# Whatever a request holds, the answer is JSON (4xx for a bad request), never a traceback.

ROW = r"([0-9]{1,%d})" % MAX_INDEX_DIGITS  # longer numbers name no row (and int() of 5000 digits raises)
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",  # no other site may show the page in a frame and click it for the listener
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class Handler(BaseHTTPRequestHandler):
    session = None  # set by make_server
    local = True  # bound to this machine only: then only a local Host header is answered
    allowed_hosts = frozenset()  # with --allow_remote: the names a request may give in its Host header

    def setup(self):
        self.timeout = READ_TIMEOUT_S  # on every read of the socket: a client that stops sending is dropped
        super().setup()  # (StreamRequestHandler.setup applies it)

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
        elif m := re.fullmatch(rf"/audio/{ROW}\.wav", url.path):
            self.send_file(self.session.voice_audio(int(m.group(1))))
        elif m := re.fullmatch(rf"/recorded/{ROW}\.wav", url.path):
            self.send_file(self.session.recording(int(m.group(1))))
        elif re.fullmatch(r"/api/(mark|save)/[0-9]+", url.path):
            raise UploadError(HTTPStatus.METHOD_NOT_ALLOWED, f"GET {url.path}: only POST")
        else:
            raise UploadError(HTTPStatus.NOT_FOUND, "not found")

    def check_origin(self):
        """Refuse what another web site's page makes the browser send here: cross-origin posts, and requests
        through a domain name that was re-pointed at this machine (DNS rebinding).

        A rebinding page controls both its Host and Origin headers (they name its own domain), so the Host
        itself must be one this server knows: a local name when bound to this machine, else an IP address,
        this machine's names or an --allowed_host. An IP address is safe to answer: a page loaded from a
        domain name never sends an IP address as its Host, and an address cannot be re-pointed."""
        host = self.headers.get("Host", "")
        if not self.host_allowed(host_name(host)):
            raise UploadError(HTTPStatus.FORBIDDEN, "requests must name this machine (localhost)" if self.local else
                              "requests must name this machine: its address, its name or an --allowed_host")
        if self.headers.get("Origin") not in (None, f"http://{host}"):
            raise UploadError(HTTPStatus.FORBIDDEN, "cross-origin request refused")

    def host_allowed(self, name):
        if self.local:
            return name in LOCAL_HOSTS
        if name in self.allowed_hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def route_post(self, url):
        if m := re.fullmatch(rf"/api/mark/{ROW}", url.path):
            index = int(m.group(1))
            self.session.row(index)
            mark = parse_json_object(self.read_body(MAX_JSON_BYTES) or b"{}").get("mark")
            self.session.mark(index, mark)
            self.send_json(self.session.state())
        elif m := re.fullmatch(rf"/api/save/{ROW}", url.path):
            index = int(m.group(1))
            self.session.row(index)
            text = parse_qs(url.query).get("text", [""])[0]
            wav = self.session.save_correction(index, self.read_body(MAX_UPLOAD_BYTES), text)
            self.send_json(dict(self.session.state(), saved=wav))
        elif url.path in ("/", "/api/session") or re.fullmatch(r"/(audio|recorded)/[0-9]+\.wav", url.path):
            raise UploadError(HTTPStatus.METHOD_NOT_ALLOWED, f"POST {url.path}: only GET")
        else:
            raise UploadError(HTTPStatus.NOT_FOUND, "not found")

    def read_body(self, limit):
        """The request's body: a Content-Length of ASCII digits, at most `limit` bytes, all of it sent."""
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise UploadError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        length = lengths[0].strip(" \t")
        if len(set(lengths)) > 1 or not re.fullmatch(r"[0-9]+", length):
            raise UploadError(HTTPStatus.BAD_REQUEST, "Content-Length must be one number of bytes (ASCII digits)")
        if len(length) > MAX_INDEX_DIGITS or int(length) > limit:
            raise UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"upload larger than {limit // 2**20} MiB"
                              if limit >= 2**20 else f"body larger than {limit} bytes")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            raise UploadError(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {self.timeout} s") from None
        if len(body) < int(length):
            raise UploadError(HTTPStatus.BAD_REQUEST, f"body of {len(body)} bytes, shorter than its Content-Length")
        return body

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line or header, a method without a do_*) as JSON,
        with the headers of every answer; an unknown method is a 405, not http.server's 501."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} not allowed: GET or POST"
        self.close_connection = True
        self.send_json(dict(error=message or HTTPStatus(code).phrase), code)

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
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, POST")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        pass  # saves are printed by the session; one line per request would bury them


def host_name(header):
    """The host of a Host header: lowercased, without its port, IPv6 brackets or a trailing dot; '' if malformed."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]*)(:[0-9]{0,5})?", header.strip())
    return m.group(1).strip("[]").rstrip(".").lower() if m else ""


def parse_json_object(body, shape='{"mark": ...}'):
    """A small JSON object from a request body: UploadError 400 (naming the `shape` expected) for anything
    else, deep nesting included."""
    try:
        text = body.decode("utf-8")
        if json_depth(text) > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH}")
        data = json.loads(text)
    except ValueError as err:
        raise UploadError(HTTPStatus.BAD_REQUEST, f"body must be JSON {shape} ({err})") from None
    if not isinstance(data, dict):
        raise UploadError(HTTPStatus.BAD_REQUEST, f"body must be JSON {shape}")
    return data


def json_depth(text):
    """How deeply `text` nests JSON arrays and objects (brackets inside strings not counted), without parsing
    it: the json module recurses once per level and raises RecursionError past about a thousand."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def machine_hosts(host, allowed=()):
    """The names a request to a server bound to `host` may give in its Host header when --allow_remote is on:
    localhost, the bound address, this machine's names and each --allowed_host (any IP address also goes)."""
    names = {*LOCAL_HOSTS, host, socket.gethostname(), socket.getfqdn(), *allowed}
    return frozenset(n.strip("[]").rstrip(".").lower() for n in names if n)


def check_address_args(parser, args):
    """--host, --allow_remote and --allowed_host of a served page (--listen, --compare): a page is served on
    this machine unless --allow_remote says otherwise."""
    if args.host not in LOCAL_HOSTS and not args.allow_remote:
        parser.error(f"--host {args.host} would let other machines write into --feedback_dir: add --allow_remote "
                     "to mean it")
    if args.allowed_host and not args.allow_remote:
        parser.error("--allowed_host names the page may be opened under from other machines: it needs "
                     "--allow_remote (a local page answers only localhost)")
    for name in args.allowed_host or []:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\.?", name):
            parser.error(f"--allowed_host {name!r}: give a host name (letters, digits, dots and hyphens; no "
                         "scheme, port or path)")
    args.allowed_host = [name.rstrip(".").lower() for name in args.allowed_host or []]


def make_server(session, host, port, allowed_hosts=(), handler=Handler):
    """A ThreadingHTTPServer serving `session` with `handler` (a Handler; port 0: any free port); the caller
    runs serve_forever.

    Bound to a local address, only local Host names are answered; else `allowed_hosts` and machine_hosts."""
    local = host in LOCAL_HOSTS
    handler = type("SessionHandler", (handler,), dict(
        session=session, local=local, allowed_hosts=frozenset() if local else machine_hosts(host, allowed_hosts)))
    server_class = type("Server", (ThreadingHTTPServer,), dict(address_family=socket.AF_INET6)) if ":" in host \
        else ThreadingHTTPServer
    server = server_class((host, port), handler)
    server.url = f"http://{f'[{host}]' if ':' in host else host}:{server.server_address[1]}/"
    return server


def newest_session(sessions_dir):
    """The folder of the session last written under `sessions_dir` (None when there is none): what --listen
    alone continues."""
    sessions = glob.glob(os.path.join(sessions_dir, "*", SESSION_FILE))
    return os.path.dirname(max(sessions, key=os.path.getmtime)) if sessions else None


def listen(args):
    """--listen: a new kit from a sentence file (as --make_session makes it), then the page on the session."""
    if os.path.isfile(args.listen):
        args.make_session = args.listen
        args.listen = make_session(args)
    serve(args.listen, args)


def serve(folder, args):
    """Open the session in `folder` and serve its page until Ctrl-C; then print what to run next."""
    session = open_session(folder, args)
    server = make_server(session, args.host, args.port, args.allowed_host or ())
    warn_remote(server, args.host, f"write into {session.feedback_dir}; browsers only allow the microphone on "
                                   "localhost or over https")
    print(f"listening session: {len(session.rows)} sentences in {folder} ({session.state()['progress']} so far); "
          f"corrections go to {session.feedback_dir}")
    if os.path.isfile(os.path.join(session.feedback_dir, "metadata.csv")):
        print(f"warning: {session.feedback_dir} holds a metadata.csv, which train_feedback.py reads instead of "
              "the audio_NNN.wav + .txt pairs saved here: use another --feedback_dir")
    serve_until_interrupted(server)
    state = session.state()
    print(f"{state['progress']} in {session.feedback_dir}; resume with: python train_feedback.py --listen {folder}")
    print(f"train on them with: {state['command']}")


def warn_remote(server, host, what):
    """The warning a page served beyond this machine prints: who can reach it and `what` they can do there."""
    if host not in LOCAL_HOSTS:
        print(f"warning: --host {host} lets other machines on the network open this page and {what}")
        names = ", ".join(sorted(server.RequestHandlerClass.allowed_hosts))
        print(f"answering only requests that name this machine by an IP address or as one of: {names} "
              "(add names with --allowed_host)")


def serve_until_interrupted(server):
    print(f"open {server.url} in a browser (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
