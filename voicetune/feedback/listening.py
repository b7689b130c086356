"""The listening session of `train_feedback.py --make_session` and `--listen`: the kit (the voice's audio of
each sentence and its text), and the page that serves it: hear the voice sentence by sentence, mark
each one good or needs work, record how it should sound and save it straight into the feedback folder as
an `audio_NNN.wav` + `audio_NNN.txt` pair, the layout the user's recording app writes.

The page (listen_page.html, served by page_server.py, which checks every request) records 16-bit PCM WAV
with Web Audio rather than MediaRecorder, whose Chromium output (WebM/Opus) libsndfile cannot decode; the
session still takes anything soundfile reads (WAV, FLAC, Ogg Vorbis/Opus, MP3).
"""

import io
import json
import os
import re
import threading
import time
import unicodedata
from http import HTTPStatus
from urllib.parse import parse_qs

import soundfile as sf
from transformers import VitsConfig

from voicetune.common import distributed
from voicetune.common import page_server
from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.common import speech
from voicetune.feedback import feedback_flags
from voicetune.feedback import feedback_run
from voicetune.feedback import listen_queue
from voicetune.feedback import verdict
from voicetune.voice import speak_lines
from voicetune.voice import speakers
from voicetune.voice import speaking

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "listen_page.html")
SESSION_FILE = run_files.SESSION
MAX_UPLOAD_BYTES = 20 * 2**20  # ~3.5 minutes of 48 kHz 16-bit mono: far longer than any sentence
# The decoded take, whatever its upload size: a compressed file (FLAC of silence, an 8-bit 100 Hz WAV) can
# hold hours. Checked from the file's header before decoding, and again block by block while decoding.
MAX_TAKE_SECONDS = 60
MAX_TAKE_SAMPLES = MAX_TAKE_SECONDS * 96000 * 2  # a minute of 96 kHz stereo: ~46 MB as float32
MIN_TAKE_SECONDS = 0.3  # of sound, after trimming silence as train_feedback.py trims its clips
DECODE_BLOCK_FRAMES = 65536
MAX_TEXT_CHARS = 1000
# The recording app's audio_NNN pairs, with no more digits than a row number (int() of thousands raises).
AUDIO_NAME = re.compile(r"audio_([0-9]{1,%d})\.\w+" % page_server.MAX_INDEX_DIGITS)
MARKS = ("good", "needs_work")
WEBM_MAGIC = b"\x1a\x45\xdf\xa3"  # EBML header: Chromium's MediaRecorder output


# ----------------------------------------------------------------------------------------------------
# The session: sentences, the voice's audio of each, the listener's marks and saved corrections.

class Session:
    """Rows of {id, text, mark, saved} kept in FOLDER/session.json; the voice's audio in FOLDER/model/<id>.wav.

    Every change is written to session.json at once, so closing the page (or the server) loses nothing.
    `last_number` is the highest audio_NNN this session ever saved: a pair moved out of the feedback folder
    never gives its number to another take.
    """

    def __init__(self, folder, feedback_dir, voice, rows, sampling_rate, vocab, last_number=0, speaker_id=None,
                 data_dir=None, sessions_dir=None):
        self.folder, self.feedback_dir, self.voice, self.speaker_id = folder, feedback_dir, voice, speaker_id
        self.data_dir = data_dir  # the training folder the tune replays, named in the page's command
        # A session drawn from the listening queue also keeps the queue's figures (its report.json).
        self.sessions_dir = sessions_dir if os.path.isfile(os.path.join(folder, run_files.QUEUE)) else None
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
            raise page_server.UploadError(HTTPStatus.NOT_FOUND, f"no sentence {index}")
        return self.rows[index]

    def state(self):
        """The rows, the progress, and what the verdict can say of the recordings in the feedback folder so far
        (the run trains on all of them, this session's and any before)."""
        heard = sum(r["mark"] is not None for r in self.rows)
        corrections = sum(r["saved"] is not None for r in self.rows)
        recorded = len(feedback_run.read_pairs(self.feedback_dir)[0]) if os.path.isdir(self.feedback_dir) else 0
        return dict(rows=self.rows, heard=heard, total=len(self.rows), corrections=corrections,
                    progress=f"{heard} of {len(self.rows)} heard, {corrections} correction{'s' * (corrections != 1)}",
                    outlook=verdict.outlook(recorded, feedback_flags.VAL_SIZE)["line"], feedback_dir=self.feedback_dir,
                    command=run_files.tune_command(self.voice, self.data_dir, self.feedback_dir, self.speaker_id),
                    session=os.path.basename(os.path.abspath(self.folder)),
                    queue=listen_queue.worth(self.folder, self.sessions_dir) if self.sessions_dir else None)

    def mark(self, index, mark):
        if mark not in MARKS:
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, f"mark must be one of {', '.join(MARKS)}")
        with self.lock:
            self.row(index)["mark"] = mark
            self.write()

    def save_correction(self, index, data, text):
        """Decode the upload, write NAME.wav (16-bit PCM at the voice's rate) + NAME.txt; return NAME.wav's path."""
        row = self.row(index)
        text = plain_text(text)
        if len(text) > MAX_TEXT_CHARS:
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, f"text longer than {MAX_TEXT_CHARS} characters")
        _, reason = speech.clean_text(text, self.vocab)
        if reason:
            raise page_server.UploadError(HTTPStatus.UNPROCESSABLE_ENTITY,
                                          f"the voice cannot learn this text ({reason}): write signs without a "
                                          "Kurmanji reading ($, °C, -5) as words, use the Latin alphabet")
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
        if self.sessions_dir:
            listen_queue.write_report(self.folder, self.sessions_dir)


def decode_upload(data, sampling_rate):
    """Whatever the browser sent, as float32 mono at the voice's rate; UploadError when it is not usable speech."""
    if data.startswith(WEBM_MAGIC):
        raise page_server.UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                      "WebM audio cannot be decoded without ffmpeg: send WAV, FLAC, Ogg or MP3")
    check_take_length(data)
    try:
        audio = speech.load_audio(io.BytesIO(data), sampling_rate)
    except speech.AudioError as err:
        raise page_server.UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                      f"not audio soundfile can read ({err})") from None
    if speech.is_silent(audio):
        raise page_server.UploadError(HTTPStatus.UNPROCESSABLE_ENTITY, "the recording is silent: check the microphone")
    sound = len(speech.trim_silence(audio)) / sampling_rate
    if sound < MIN_TAKE_SECONDS:
        raise page_server.UploadError(HTTPStatus.UNPROCESSABLE_ENTITY, f"the take holds only {sound:.2f} s of sound "
                                      f"(at least {MIN_TAKE_SECONDS} s): record the whole sentence")
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
    except page_server.UploadError:
        raise
    except Exception as err:  # noqa: BLE001 - libsndfile reports corrupt input with several exception types
        raise page_server.UploadError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                      f"not audio soundfile can read ({str(err).split(': ')[-1].strip()})") from None


def refuse_long_take(frames, samplerate, channels):
    if frames > MAX_TAKE_SECONDS * samplerate or frames * channels > MAX_TAKE_SAMPLES:
        raise page_server.UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                      f"the take is longer than {MAX_TAKE_SECONDS} s once decoded (or holds more "
                                      f"than {MAX_TAKE_SAMPLES} samples): record one sentence at a time")


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

def load_voice(args):
    """(model on --device, tokenizer, the letters it says, the speaker the session speaks with)."""
    model, tokenizer = speaking.load(args.model)
    _, vocab = speech.load_vocab(args.model)
    speaker = speakers.feedback_speaker(model.config, speakers.read_table(args.model), args.speaker_id)
    model.to(distributed.resolve_device(args.device))
    return model, tokenizer, vocab, speaker


def sentence_file(path):
    """The sentences of a sentence file (--make_session, --listen FILE): its non-empty lines, stripped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def make_session(args, lines=None, voice=None):
    """Speak every sentence of args.make_session (or `lines`) with args.model (or `voice`, load_voice's) into
    OUTPUT_DIR/model/sNNN.wav and write sNNN.txt: recordings saved as sNNN.wav beside them make the folder a
    feedback folder as it is. Returns (the folder, [(sNNN, line)] of the sentences spoken)."""
    if lines is None:
        lines = sentence_file(args.make_session)
    model, tokenizer, vocab, speaker = voice or load_voice(args)
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
        raise run_errors.TrainingError(f"--make_session {args.make_session or args.listen}: no sentence the voice "
                                       "can say")
    out = args.output_dir
    model_dir = os.path.join(out, "model")
    speak_lines.speak_files(speaking.TorchVoice(model, tokenizer, speaker, speaking.SAMPLE_MAX_SECONDS),
                            [(wav, text) for (wav, _), text in zip(rows, spoken)], model_dir)
    for wav, text in rows:
        with open(os.path.join(out, os.path.splitext(wav)[0] + ".txt"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
    with open(os.path.join(out, "README.txt"), "w", encoding="utf-8") as f:
        f.write(kit_readme(args, out, speaker))
    for line, reason in unspeakable:
        print(f"left out ({reason}): {line}")
    print(f"session kit: {len(rows)} sentences in {out} (README.txt says how to record: with the listening page "
          f"into {args.feedback_dir}, or by hand into {out})")
    return out, [(os.path.splitext(wav)[0], line) for wav, line in rows]


def kit_readme(args, out, speaker):
    """The kit's README.txt: the two ways to record, each naming the folder its recordings go to and the
    command that tunes on them (the page saves into --feedback_dir, a recording app into the kit)."""
    return (f"Listening session made {time.strftime('%Y-%m-%d %H:%M')} with {args.model}"
            + (f", speaker {speaker}" if speaker is not None else "") + ".\n\n"
            f"With the listening page, which saves each correction into {args.feedback_dir}:\n"
            f"1. {run_files.listen_command(out, args.model, args.data_dir, args.feedback_dir, speaker)}\n"
            "   then open the address it prints: hear each sentence, mark it, and record and save the ones the\n"
            "   voice says badly.\n"
            f"2. {run_files.tune_command(args.model, args.data_dir, args.feedback_dir, speaker)}\n\n"
            "Or by hand, with any recording app, into this folder:\n"
            "1. Listen to model/sNNN.wav; sNNN.txt holds what each one should say.\n"
            "2. For every sentence the voice says badly, record it as it should sound and save it in this\n"
            "   folder as sNNN.wav, beside its sNNN.txt (another format such as sNNN.flac or sNNN.mp3 is\n"
            "   fine). Sentences you do not record are left out.\n"
            f"3. {run_files.tune_command(args.model, args.data_dir, out, speaker)}\n")


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
    speakable, queued = [], listen_queue.read(folder)
    for r in rows:
        text, reason = speech.clean_text(r["text"], vocab)
        if reason:
            print(f"left out ({reason}): {plain_text(r['text'])}")
        else:
            r["reads"] = text  # the words the voice says (numbers read out), shown on the page
            if r["id"] in queued:
                r["reason"] = queued[r["id"]]["reason"]  # which signal put it in the queue, shown on the page
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
    session = Session(folder, args.feedback_dir, args.model, rows, config.sampling_rate, vocab, last_number, speaker,
                      args.data_dir, os.path.join(args.data_dir, run_files.SESSIONS))
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
# The page's routes (page_server.py checks every request and answers every refusal): the session as JSON,
# audio by row number, marks and uploads. Every file name is the session's own.

class Handler(page_server.Handler):
    page = PAGE

    def send_voice_audio(self, row):
        self.send_file(self.session.voice_audio(row))

    def send_recording(self, row):
        self.send_file(self.session.recording(row))

    def mark(self, row):
        self.session.row(row)
        self.session.mark(row, self.read_json_object('{"mark": ...}').get("mark"))
        self.send_json(self.session.state())

    def save(self, row):
        self.session.row(row)
        text = parse_qs(self.url.query).get("text", [""])[0]
        wav = self.session.save_correction(row, self.read_body(MAX_UPLOAD_BYTES), text)
        self.send_json(dict(self.session.state(), saved=wav))

    routes = (("GET", "/api/session", page_server.Handler.send_state),
              ("GET", r"/audio/{row}\.wav", send_voice_audio),
              ("GET", r"/recorded/{row}\.wav", send_recording),
              ("POST", "/api/mark/{row}", mark),
              ("POST", "/api/save/{row}", save))


def listen(args):
    """--listen: a new kit (as --make_session makes it) of the queue's sentences or a sentence file's, with its
    queue.tsv, then the page on the session."""
    if args.listen_count or os.path.isfile(args.listen):
        # The address tried first: a port in use is said before the voice has spoken every sentence.
        page_server.make_server(Handler, None, args.host, args.port).server_close()
        args.listen = make_queued_session(args)
    serve(args.listen, args)


def make_queued_session(args):
    """A new kit: args.listen_count sentences of the listening queue (one in five a control), or a sentence
    file's, all of them in the file's order; queue.tsv beside it holds each one's rank, scores and reason."""
    voice = load_voice(args)
    model, tokenizer, vocab, speaker = voice
    lines = None
    if not args.listen_count:
        args.make_session = args.listen
        lines = sentence_file(args.listen)
    print(f"ranking {'the pool' if lines is None else args.listen} with {args.model} ...")
    rows = listen_queue.build(args, model, tokenizer, vocab, speaker, lines)
    if not rows:
        raise run_errors.TrainingError("--listen: no sentence left in the pool that is not recorded or marked good "
                                       "for this voice already (add sentences with --pool FILE)")
    if lines is not None:
        order = {line: i for i, line in reversed(list(enumerate(lines)))}
        rows.sort(key=lambda r: order[r["sentence"]])
        lines = [r["sentence"] for r in rows] + [line for line in lines if speech.clean_text(line, vocab)[1]]
    folder, named = make_session(args, lines or [r["sentence"] for r in rows], voice)
    for r, (name, _) in zip(rows, named):
        r["id"] = name
    listen_queue.write(folder, rows)
    return folder


def serve(folder, args):
    """Open the session in `folder` and serve its page until Ctrl-C; then print what to run next."""
    session = open_session(folder, args)
    server = page_server.make_server(Handler, session, args.host, args.port, args.allowed_host or ())
    page_server.warn_remote(server, args.host, f"write into {session.feedback_dir}; browsers only allow the "
                                               "microphone on localhost or over https")
    print(f"listening session: {len(session.rows)} sentences in {folder} ({session.state()['progress']} so far); "
          f"corrections go to {session.feedback_dir}")
    if os.path.isfile(os.path.join(session.feedback_dir, "metadata.csv")):
        print(f"warning: {session.feedback_dir} holds a metadata.csv, which train_feedback.py reads instead of "
              "the audio_NNN.wav + .txt pairs saved here: use another --feedback_dir")
    page_server.serve_until_interrupted(server)
    state = session.state()
    print(f"{state['progress']} in {session.feedback_dir}; resume with: "
          f"{run_files.listen_command(folder, session.voice, session.data_dir, session.feedback_dir)}")
    print(f"train on them with: {state['command']}")

