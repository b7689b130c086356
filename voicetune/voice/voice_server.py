"""speak.py --serve: the current voice of a training folder served to apps, following --promote and --rollback
without a restart. An OpenAI-compatible `POST /v1/audio/speech` (+ `GET /v1/models`, `GET /v1/audio/voices`,
as Kokoro-FastAPI has them) and, with --wyoming_port, a Wyoming endpoint for Home Assistant. Text is read as
speak.py reads it (numbers as Kurmanji words, each sentence spoken whole) on torch or, with --onnx, on
onnxruntime.

It lives beside page_server.py, the one hardened server of the served pages (Host and Origin checks, bounded
bodies, depth-limited JSON, one-line JSON refusals), whose handler it extends: the voice wing may not import
the feedback wing, and moving page_server down into common/ would touch the listening and comparison pages.

Following the voice: before each request the server compares the current voice folder (voices.current_voice)
and a stat of its files (name, size, mtime, inode) with the voice it has loaded; when they differ it loads
the new one, and requests already speaking finish with the voice object they hold. While a swap's journal
(voices/swap.json) is on disk, or when the folder changed while it was being loaded, the loaded voice stays:
a half-done swap is never loaded.
"""

import asyncio
import io
import os
import threading
import time
from http import HTTPStatus

import soundfile as sf

from voicetune.common import page_server
from voicetune.common import run_errors
from voicetune.common import speech
from voicetune.voice import speak_lines
from voicetune.voice import voices

MAX_INPUT_CHARS = 4096  # OpenAI's own limit on `input`
MAX_BODY_BYTES = 4 * MAX_INPUT_CHARS + 1024  # the input in UTF-8 and the other fields
WAIT_FOR_WORK_S = 30  # a request waits this long for a free synthesis slot, then is answered 503
FORMATS = {"wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm"}  # pcm: 16-bit little-endian mono
MODELS = ("tts-1", "tts-1-hd", "voicetune")  # any is accepted: OpenAI clients send one of theirs
SPEED_RANGE = (0.25, 4.0)  # OpenAI's
SENTENCE_PAUSE = 0.3
LANGUAGE = "ku_TR"


def folder_stamp(folder):
    """What changes when another voice takes the folder's place: each file's name, size, mtime and inode."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        return tuple((e.name, *(lambda s: (s.st_size, s.st_mtime_ns, s.st_ino))(e.stat())) for e in entries)
    except OSError:
        return None


class FollowedVoice:
    """The current voice of `data_dir`, loaded by `load(folder)` (a TorchVoice or an OnnxVoice) and reloaded when
    a promote or a rollback has replaced it."""

    def __init__(self, data_dir, load):
        self.data_dir, self.load = data_dir, load
        self.journal = voices.paths(data_dir)["journal"]
        self.lock = threading.Lock()
        self.loaded = None  # (folder, stamp, voice, vocab)

    def current(self):
        """(voice, vocab, folder) of the voice in use now; run_errors.TrainingError when there is none."""
        with self.lock:
            for _ in range(int(WAIT_FOR_WORK_S / 0.2)):
                if self.journal.is_file():
                    if self.loaded:
                        return self.loaded[2:] + (self.loaded[0],)
                    time.sleep(0.2)  # started during a swap: wait for it to end
                    continue
                folder = voices.current_voice(self.data_dir)
                stamp = folder_stamp(folder)
                if stamp is None:
                    raise run_errors.TrainingError(f"no voice in --data_dir {self.data_dir} (neither voice/ nor "
                                                   "final_model/ there): train one with train_vits.py")
                if self.loaded and self.loaded[:2] == (folder, stamp):
                    return self.loaded[2:] + (folder,)
                voice, vocab = self.load(str(folder))
                if not self.journal.is_file() and folder_stamp(folder) == stamp:
                    self.loaded = (folder, stamp, voice, vocab)
                    print(f"speaking with {folder}")
                    return voice, vocab, folder
            raise run_errors.TrainingError(f"{self.data_dir}: the voice kept changing while it was loaded")


def torch_loader(settings):
    def load(folder):
        from voicetune.voice import speaking

        voice = speaking.TorchVoice.load(folder, **settings)
        voice.lock = threading.Lock()  # one model, its speaking rate and noise seed set per request
        return voice, speech.load_vocab(folder)[1]
    return load


def onnx_loader(out_dir, settings):
    """Each voice exported (onnx_voice.export, checked against torch) into `out_dir`, then spoken on onnxruntime."""
    def load(folder):
        from voicetune.voice import onnx_voice
        from voicetune.voice import speaking

        model, tokenizer = speaking.load(folder)
        onnx_voice.export(model, tokenizer, out_dir)
        voice = onnx_voice.open_voice(out_dir, None, **settings)
        voice.lock = None  # onnxruntime runs sessions from several threads; the scales are passed per call
        return voice, voice.vocab
    return load


def speaker_names(voice, folder):
    """{name: speaker id} of the voice (speakers.json's client ids, else speaker_N); {"default": None} alone."""
    count = voice.speakers if hasattr(voice, "speakers") else max(voice.model.config.num_speakers, 1)
    if count <= 1:
        return {"default": None}
    from voicetune.voice import speakers

    table = {int(row["id"]): str(row["client_id"]) for row in speakers.read_table(str(folder)) or []}
    return {table.get(i, f"speaker_{i}"): i for i in range(count)}


class Speaker:
    """Text to audio with the followed voice, at most `max_concurrent` syntheses at a time."""

    def __init__(self, followed, max_concurrent):
        self.followed = followed
        self.slots = threading.BoundedSemaphore(max_concurrent)

    def sentences(self, text, vocab):
        """The cleaned sentences of `text` (numbers as words); page_server.UploadError 400 saying why not."""
        try:
            return speak_lines.sentences_of(text, vocab)
        except speak_lines.Unsayable as err:
            what = "input" if err.part == text else f"input {err.part!r}"
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, f"{what} cannot be read: {err.why}") from None

    def voices(self):
        voice, _, folder = self.followed.current()
        return list(speaker_names(voice, folder))

    def speak(self, text, voice_name=None, speed=1.0):
        """(float32 audio, sampling rate) of `text` in the voice's speaker `voice_name` (None: the first)."""
        voice, vocab, folder = self.followed.current()
        names = speaker_names(voice, folder)
        if voice_name is not None and voice_name not in names and len(names) > 1:
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, f"voice {voice_name!r}: this voice has "
                                          f"{', '.join(names)}")
        speaker_id = names.get(voice_name, next(iter(names.values())))
        sentences = self.sentences(text, vocab)
        if not self.slots.acquire(timeout=WAIT_FOR_WORK_S):
            raise page_server.UploadError(HTTPStatus.SERVICE_UNAVAILABLE, "busy: try again")
        try:
            return say(voice, sentences, speaker_id, speed), voice.sampling_rate
        finally:
            self.slots.release()


def say(voice, sentences, speaker_id, speed):
    if voice.lock is None:
        length_scale = voice.scales["length_scale"] or voice.defaults["length_scale"]
        scales = dict(speaker_id=speaker_id, length_scale=length_scale / speed)
        clips = [voice.say(sentence, **scales) for sentence in sentences]
    else:
        with voice.lock, voice.seeded(0):
            model = voice.model
            saved = model.speaking_rate
            model.speaking_rate = saved * speed
            voice.speaker_id = speaker_id
            try:
                clips = [voice.say(sentence) for sentence in sentences]
            finally:
                model.speaking_rate = saved
    return speech.join_sentences(clips, voice.sampling_rate, SENTENCE_PAUSE)


def encode(audio, rate, response_format):
    if response_format == "pcm":
        return speech.to_int16(audio).tobytes()
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, subtype="PCM_16", format=response_format.upper())
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------
# The OpenAI-compatible HTTP API.

class Handler(page_server.Handler):
    speaker = None  # the Speaker: set by make_server

    def send_page(self):
        self.send_json(dict(voice=LANGUAGE, endpoints=["POST /v1/audio/speech", "GET /v1/models",
                                                       "GET /v1/audio/voices"]))

    def send_models(self):
        self.send_json(dict(object="list", data=[dict(id=m, object="model", created=0, owned_by="voicetune")
                                                 for m in MODELS]))

    def send_voices(self):
        self.send_json(dict(voices=self.speaker.voices()))

    def send_speech(self):
        request = page_server.parse_json_object(self.read_body(MAX_BODY_BYTES), '{"input": "...", "voice": "..."}')
        text, voice_name = request.get("input"), request.get("voice")
        response_format, speed = request.get("response_format", "wav"), request.get("speed", 1.0)
        if not isinstance(text, str) or not text.strip():
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, "input: give the text to speak")
        if len(text) > MAX_INPUT_CHARS:
            raise page_server.UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                          f"input longer than {MAX_INPUT_CHARS} characters")
        if voice_name is not None and not isinstance(voice_name, str):
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, "voice: a name from GET /v1/audio/voices")
        if not isinstance(request.get("model", ""), str):
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, "model: a name from GET /v1/models")
        if response_format not in FORMATS:
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, f"response_format: one of {', '.join(FORMATS)}")
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or \
                not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, f"speed: a number from {SPEED_RANGE[0]} to "
                                          f"{SPEED_RANGE[1]}")
        try:
            audio, rate = self.speaker.speak(text, voice_name, float(speed))
        except run_errors.TrainingError as err:
            raise page_server.UploadError(HTTPStatus.SERVICE_UNAVAILABLE, str(err)) from None
        self.send_bytes(encode(audio, rate, response_format), FORMATS[response_format])

    routes = (("POST", "/v1/audio/speech", send_speech), ("GET", "/v1/models", send_models),
              ("GET", "/v1/audio/voices", send_voices))


def make_server(speaker, host, port):
    server = page_server.make_server(Handler, None, host, port)
    server.RequestHandlerClass.speaker = speaker
    server.daemon_threads = True
    return server


# ----------------------------------------------------------------------------------------------------
# The Wyoming endpoint (Home Assistant).

def wyoming_handler(speaker):
    """A wyoming AsyncEventHandler class answering Describe with the voice and Synthesize with its audio."""
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.error import Error
    from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice, TtsVoiceSpeaker
    from wyoming.server import AsyncEventHandler
    from wyoming.tts import Synthesize

    attribution = Attribution(name="voicetune", url="")

    class VoiceHandler(AsyncEventHandler):
        async def handle_event(self, event):
            loop = asyncio.get_running_loop()
            if Describe.is_type(event.type):
                names = await loop.run_in_executor(None, speaker.voices)
                voice = TtsVoice(name="voicetune", description="Kurmanji (the current voice)", attribution=attribution,
                                 installed=True, version=None, languages=[LANGUAGE],
                                 speakers=None if names == ["default"] else [TtsVoiceSpeaker(n) for n in names])
                await self.write_event(Info(tts=[TtsProgram(
                    name="voicetune", description="The current voice of a voicetune training folder",
                    attribution=attribution, installed=True, version=None, voices=[voice],
                    supports_synthesize_streaming=False)]).event())
                return True
            if Synthesize.is_type(event.type):
                request = Synthesize.from_event(event)
                name = request.voice.speaker if request.voice else None
                try:
                    audio, rate = await loop.run_in_executor(None, speaker.speak, request.text, name, 1.0)
                except (page_server.UploadError, run_errors.TrainingError) as err:
                    await self.write_event(Error(text=str(err)).event())
                    return True
                data = speech.to_int16(audio).tobytes()
                await self.write_event(AudioStart(rate=rate, width=2, channels=1).event())
                for start in range(0, len(data), 2048):
                    await self.write_event(AudioChunk(rate=rate, width=2, channels=1,
                                                      audio=data[start:start + 2048]).event())
                await self.write_event(AudioStop().event())
            return True

    return VoiceHandler


def start_wyoming(speaker, host, port):
    """Serve the Wyoming endpoint on host:port from a thread of its own; (thread, the port it took)."""
    try:
        handler = wyoming_handler(speaker)
    except ImportError:
        raise run_errors.TrainingError("--wyoming_port needs the wyoming package: pip install wyoming") from None
    loop = asyncio.new_event_loop()

    async def start():
        server = await asyncio.start_server(lambda reader, writer: handler(reader, writer).run(), host, port)
        return server.sockets[0].getsockname()[1]

    taken = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return thread, taken


# ----------------------------------------------------------------------------------------------------
# speak.py --serve.

def serve(args, ready=None):
    """Serve `args.data_dir`'s current voice on args.host:args.port (and the Wyoming endpoint on
    args.wyoming_port) until Ctrl-C; `ready(server, wyoming_port)` is called once both listen."""
    settings = speak_lines.settings(args)
    load = onnx_loader(args.onnx, settings) if args.onnx else torch_loader(settings)
    speaker = Speaker(FollowedVoice(args.data_dir, load), args.max_concurrent)
    speaker.followed.current()  # a missing voice stops here, before anything listens
    server = make_server(speaker, args.host, args.port)
    wyoming_port = None
    if args.wyoming_port is not None:
        wyoming_port = start_wyoming(speaker, args.host, args.wyoming_port)[1]
        print(f"Wyoming (Home Assistant): tcp://{args.host}:{wyoming_port}")

    def announce():
        print(server.url.rstrip("/"), flush=True)
        if ready:
            ready(server, wyoming_port)
    page_server.serve_until_interrupted(server, announce)
