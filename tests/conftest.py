"""What the tests share, built at test time and never downloaded: a tiny Kurmanji VITS model, a small
Common Voice-shaped release spoken by espeak-ng, that release prepared by prepare_data.py, a voice folder
and feedback clips as users hand them over; and the helpers several test files use (import them with
`from conftest import ...`): the quick flags, the tiny trainer, a disk that fills, the one error line."""

import asyncio
import builtins
import errno
import http.client
import json
import multiprocessing
import os
import queue
import shutil
import socket
import threading

import huggingface_hub
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file
from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from voicetune.common import page_server
from voicetune.common import run_files
from voicetune.night import clip_data
from voicetune.voice import models
import prepare_data
import train_feedback
from voicetune.night import training_flags
from voicetune.night import vits_trainer
from examples.make_release import BAD_KINDS, SENTENCES, espeak_clip, make_release, make_tarball, pad_silence
from examples.tiny_model import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
DOCS = os.path.join(ROOT, "docs")

# Good clips in `kmr_release`; it also holds one clip of every kind in BAD_KINDS.
GOOD_CLIPS = 12

# Flags that keep a CPU run of the tiny model quick; every other flag keeps its real default.
QUICK_FLAGS = dict(device="cpu", batch_size=2, grad_accum=2, disc_channels=64, benchmark_samples=4, num_workers=1,
                   warmup_steps=2, d_warmup_steps=1)


def quick(**changes):
    """QUICK with some flags changed (a value of None leaves that flag at its real default)."""
    flags = dict(QUICK_FLAGS, **changes)
    return [arg for name, value in flags.items() if value is not None for arg in (f"--{name}", str(value))]


QUICK = quick()
# A feedback tune: its critic is the voice's own, feedback weighs as much as replay, 2 clips held out.
FEEDBACK_QUICK = quick(d_warmup_steps=0, feedback_weight=1, val_size=2)


def tiny_trainer(model_dir, *flags, precision="fp32", steps=1000):
    """The tiny voice and a fresh 64-channel critic (seeded) on the CPU: one micro-batch of 2 a step, a peak
    learning rate of 2e-4 without warm-up, scheduled over `steps`; `flags` change any of it."""
    model, _ = models.load_voice(model_dir)
    models.prepare_for_training(model)
    args = training_flags.parse(["--lr", "2e-4", "--warmup_steps", "0", "--grad_accum", "1", "--batch_size", "2",
                                 "--disc_channels", "64", *flags])
    torch.manual_seed(0)
    trainer = vits_trainer.VitsTrainer(model, models.VitsDiscriminator(max_channels=64), args, torch.device("cpu"),
                                       precision)
    trainer.schedule(steps)
    return trainer


def ragged_items(clipset, n=3):
    """n clips of distinct lengths (the shortest such), so the batch holds padding."""
    by_frames = {}
    for i in sorted(range(len(clipset)), key=clipset.frames):
        by_frames.setdefault(clipset.frames(i), i)
    picked = list(by_frames.values())[:n]
    assert len(picked) == n
    return [(clipset, i) for i in picked]


def short_batch(clips, n=4, segment_frames=32):
    """The n shortest clips as one batch: a step on it runs the whole generator quickly."""
    shortest = sorted(range(len(clips)), key=clips.frames)[:n]
    return clip_data.collate([(clips, i) for i in shortest], segment_frames)


def fake_checkpoint(path, step, epoch, batches_done=0):
    """A checkpoint file holding only the progress it records (what ordering and pruning read)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(trainer=dict(step=step), epoch=epoch, batches_done=batches_done), path)


def tree(folder):
    """Every file and folder under `folder`, as sorted relative paths."""
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, dirs, files in os.walk(folder)
                  for name in dirs + files)


class FullDisk:
    """A file that takes `room` more bytes (characters in text mode), then fails its write with ENOSPC as
    write() does on a full disk: that OSError names no file, open() and write() do not know it."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if not isinstance(data, str):
            data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.f.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def make_disk_full(monkeypatch, full, room):
    """Files opened for writing whose path `full(path)` accepts take `room` bytes each, then ENOSPC."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") and full(os.fspath(file)):
            return FullDisk(f, room)
        return f
    monkeypatch.setattr(builtins, "open", fake_open)


def one_error_line(stderr):
    """The one `error:` line a script printed (progress bars aside), with no traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


def effective_weights(disc):
    """A critic's weights as its convolutions use them (weight norm folded), by module name."""
    return {name: module.weight.detach().clone() for name, module in disc.named_modules()
            if hasattr(module, "parametrizations")}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine two threads wait on each other in every op, and a CPU
    run of the tiny model gets several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a tiny random VitsModel + VitsTokenizer (Kurmanji Latin alphabet)."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def kmr_release(tmp_path_factory):
    """Common Voice language folder: GOOD_CLIPS espeak-ng clips (32/48 kHz, one 44.1 kHz stereo)
    plus one bad clip of each kind in BAD_KINDS. Treat as read-only."""
    return make_release(str(tmp_path_factory.mktemp("cv-kmr")), GOOD_CLIPS, seed=0, bad_kinds=BAD_KINDS)


@pytest.fixture(scope="session")
def kmr_tarball(kmr_release, tmp_path_factory):
    """`kmr_release` packed as cv-corpus-*/kmr/ in a .tar.gz, clips before TSVs."""
    return make_tarball(kmr_release, str(tmp_path_factory.mktemp("tar") / "cv-corpus-99.0-2026-01-01-kmr.tar.gz"))


@pytest.fixture(scope="session")
def prepared_dataset(kmr_release, tiny_model_dir, tmp_path_factory):
    """prepare_data.py output for `kmr_release`: wavs/ (16 kHz mono PCM_16) + metadata.csv with the
    GOOD_CLIPS clips, plus prepare_report.json. Treat as read-only (copy it to change it)."""
    out = str(tmp_path_factory.mktemp("prepared"))
    prepare_data.main(["--input", kmr_release, "--model", tiny_model_dir, "--output_dir", out, "--workers", "1"])
    assert os.path.isfile(os.path.join(out, "metadata.csv"))
    return out


@pytest.fixture(scope="session")
def tiny_clips(prepared_dataset, tiny_model_dir, tmp_path_factory):
    """`prepared_dataset` preloaded as the trainer holds it (int16 audio, fp16 mels, 2n+1 token ids)."""
    _, tokenizer = models.load_voice(tiny_model_dir)
    clips, errors = clip_data.load_clips(prepared_dataset, 16000, str(tmp_path_factory.mktemp("cache")), 1)
    assert not errors
    return clip_data.ClipSet(clips, tokenizer)


@pytest.fixture(scope="session")
def trained_voice(tiny_model_dir, tmp_path_factory):
    """A voice folder as train_vits.py leaves it: save_pretrained files plus discriminator.pt. Read-only."""
    model, tokenizer = models.load_voice(tiny_model_dir)
    models.prepare_for_training(model)
    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("voice") / "final_model")
    models.export_voice(model, tokenizer, models.VitsDiscriminator(max_channels=64), out)
    return out


# (file, text, sample rate, stereo, format) of the good clips in `feedback_dir`: every container and rate a
# phone or a studio might hand over.
GOOD_FEEDBACK = [
    ("flac_stereo.flac", SENTENCES[7], 44100, True, "FLAC"),
    ("wav_22k.wav", SENTENCES[8], 22050, False, "WAV"),
    ("mp3_32k.mp3", SENTENCES[10], 32000, False, "MP3"),
    ("ogg_48k.ogg", SENTENCES[12], 48000, False, "OGG"),
    ("wav_16k.wav", SENTENCES[16], 16000, False, "WAV"),
    ("wav_24k_stereo.wav", SENTENCES[19], 24000, True, "WAV"),
]


@pytest.fixture(scope="session")
def feedback_dir(tmp_path_factory):
    """Feedback recorded in six formats/rates (GOOD_FEEDBACK), plus one corrupt file and one text with
    a sign it cannot read. Read-only."""
    out = str(tmp_path_factory.mktemp("feedback"))
    rows = []
    for name, text, sr, stereo, fmt in GOOD_FEEDBACK:
        audio = espeak_clip(text, sr, stereo=stereo)
        if name == "wav_16k.wav":
            audio = pad_silence(audio, sr, 1.0, np.random.default_rng(0))  # as a phone records it
        sf.write(os.path.join(out, name), audio, sr, format=fmt)
        rows.append(f"{name}|{text}")
    with open(os.path.join(out, "corrupt.wav"), "wb") as f:
        f.write(b"RIFF\x00\x01\x00\x00WAVEfmt garbage" * 10)
    rows.append(f"corrupt.wav|{SENTENCES[13]}")
    sf.write(os.path.join(out, "unreadable.wav"), espeak_clip("Ew bîst û pênc e.", 16000), 16000)
    rows.append("unreadable.wav|Ew $25 e.")  # a currency sign has no agreed Kurmanji reading
    with open(os.path.join(out, "metadata.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    return out


@pytest.fixture
def two_second_steps(monkeypatch):
    """The budget's clock counts 2 s a training step (benchmark steps included) and nothing else, so a
    deadline falls at a known step on any machine, slow or busy. Returns the clock, [seconds]."""
    from voicetune.night import planning
    from voicetune.night import vits_trainer

    clock, real_window = [0.0], vits_trainer.VitsTrainer.train_window

    def two_second_window(trainer, *args, **kwargs):
        clock[0] += 2.0
        return real_window(trainer, *args, **kwargs)
    monkeypatch.setattr(vits_trainer.VitsTrainer, "train_window", two_second_window)
    monkeypatch.setattr(planning.Budget, "used", lambda budget: budget.used_before + clock[0])
    return clock


@pytest.fixture
def spawn_start_method():
    """Process pools start their workers as on Windows (and macOS): fresh interpreters that import what
    they run, so a lambda, a closure or an unguarded script would fail here."""
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    yield
    multiprocessing.set_start_method(before, force=True)


# The morning after: a night and a feedback run on its voice, as report.html and --compare find them.
NIGHT_SENTENCES = ["Roj baş, tu çawa yî?", "Ez bi kurdî diaxivim."]  # the listening samples of both runs
FEEDBACK_TEXTS = ["Zarok di baxçe de dilîzin.", "Sibê ez ê biçim bazarê.", "Çiya bi berfê spî bûne.",
                  "Ez zimanê kurdî hîn dibim."]
RUN_FLAGS = ["--device", "cpu", "--batch_size", "2", "--grad_accum", "2", "--disc_channels", "64",
             "--benchmark_samples", "4", "--num_workers", "1", "--warmup_steps", "2", "--val_size", "2",
             "--eval_clips", "1"]


def recording_pages(folder, run):
    """Run `run()`; return the progress.json of `folder` at every rewrite of its report.html."""
    from voicetune.common import run_files
    from voicetune.night import run_report

    pages, real = [], run_report.write

    def write(output_dir):
        pages.append(run_files.read_progress(output_dir))
        return real(output_dir)
    run_report.write = write
    try:
        run()
    finally:
        run_report.write = real
    return pages


@pytest.fixture(scope="session")
def night_run(prepared_dataset, tiny_model_dir, tmp_path_factory):
    """(folder, pages) of a two-epoch tiny train_vits.py night with every voice-quality measure; pages: the
    progress.json at each rewrite of its report.html. Treat as read-only."""
    import train_vits

    home = tmp_path_factory.mktemp("night")
    sentences = home / "sentences.txt"
    sentences.write_text("\n".join(NIGHT_SENTENCES) + "\n", encoding="utf-8")
    out = str(home / "night")
    argv = ["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out, "--epochs", "2",
            "--sample_sentences", str(sentences), "--d_warmup_steps", "1"] + RUN_FLAGS
    pages = recording_pages(out, lambda: train_vits.main(argv) == 0 or pytest.fail("the night failed"))
    return out, pages


@pytest.fixture(scope="session")
def feedback_run(night_run, prepared_dataset, tmp_path_factory):
    """(home, run folder) of a feedback run on the night's voice, home/training its training folder (the night's
    data, as prepare_data.py wrote it). home/training/feedback holds the corrections
    (audio_001..004 pairs) of the listening session in home/training/sessions/2026-12-05, which marked one more
    sentence good, one needs work (corrected as audio_002) and left one unheard. Treat as read-only."""
    from voicetune.common import speech
    from voicetune.feedback import listening
    from examples.make_release import SENTENCES, espeak_clip

    home = tmp_path_factory.mktemp("morning")
    shutil.copytree(prepared_dataset, home / "training")  # one home: the night's data, then the mornings after
    feedback = home / "training" / "feedback"
    feedback.mkdir(parents=True)
    for i, text in enumerate(FEEDBACK_TEXTS, 1):
        speech.write_wav(str(feedback / f"audio_{i:03d}.wav"), espeak_clip(text, 16000), 16000)
        (feedback / f"audio_{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    voice = os.path.join(night_run[0], "final_model")
    rows = [dict(id="s001", text=SENTENCES[5], mark="good", saved=None),
            dict(id="s002", text=FEEDBACK_TEXTS[1], mark="needs_work", saved=str(feedback / "audio_002.wav")),
            dict(id="s003", text=SENTENCES[6], mark=None, saved=None)]
    session_dir = home / "training" / "sessions" / "2026-12-05"
    session_dir.mkdir(parents=True)
    listening.Session(str(session_dir), str(feedback), voice, rows, 16000, None, 4).write()
    out = str(home / "training" / "feedback_models" / "20261205-070000")
    argv = ["--model", voice, "--data_dir", str(home / "training"), "--feedback_dir", str(feedback), "--output_dir", out,
            "--max_steps", "2", "--feedback_weight", "1", "--d_warmup_steps", "0",
            "--sample_sentences", os.path.join(os.path.dirname(night_run[0]), "sentences.txt")] + RUN_FLAGS
    assert train_feedback.main(argv) == 0
    return str(home), out


# ----------------------------------------------------------------------------------------------------
# The Hub offline: files laid out as huggingface_hub caches them.

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(hf_home, repo, files):
    """Lay files into HF_HOME/hub as huggingface_hub caches a repo: refs/main naming a snapshot folder."""
    folder = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for name, write in files.items():
        target = os.path.join(folder, "snapshots", COMMIT, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write(target)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF_HOME used offline, in this process as a child process would see it from the env."""
    hf_home = str(tmp_path / "hf_home")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.path.join(hf_home, "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hf_home

# ----------------------------------------------------------------------------------------------------
# Helpers several test files share: a command serving in a thread, raw requests, headless Chromium and its
# screenshots, a free port, a Wyoming client, finished feedback runs made by hand, a tiny facebook/mms-1b-all.

class Served:
    """train_feedback.main(argv) serving in a thread; requests go to its port on 127.0.0.1."""

    def __init__(self, argv, monkeypatch):
        serving = queue.Queue()
        real = page_server.make_server

        def capture(*args):
            server = real(*args)
            serve = server.serve_forever
            server.serve_forever = lambda: serving.put(server) or serve()  # after the start-up lines are printed
            return server

        monkeypatch.setattr(page_server, "make_server", capture)
        self.code = []
        self.thread = threading.Thread(target=lambda: self.code.append(train_feedback.main(argv)))
        self.thread.start()
        self.server = None
        while self.server is None:
            try:
                self.server = serving.get(timeout=1)
            except queue.Empty:
                assert self.thread.is_alive(), f"main() returned {self.code} instead of serving"
        monkeypatch.setattr(page_server, "make_server", real)
        self.port = self.server.server_address[1]

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, data

    def save(self, index, audio_bytes, text, content_type="audio/wav"):
        from urllib.parse import quote
        status, data = self.request("POST", f"/api/save/{index}?text={quote(text)}", audio_bytes,
                                    {"Content-Type": content_type})
        return status, json.loads(data)

    def stop(self):
        self.server.shutdown()
        self.thread.join()
        assert self.code == [0]


def raw_request(port, method, path, headers=(), body=b"", address="127.0.0.1"):
    """One request with exactly `headers` (http.client adds no Host, Content-Length or Accept-Encoding):
    (status, headers, JSON answer or raw body)."""
    conn = http.client.HTTPConnection(address, port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.getheader("Content-Type") == "application/json":
        data = json.loads(data) if data else {}  # (no body to a HEAD)
    return response.status, response, data


def chromium(tmp_path, capture_wav=None, network_log=False):
    """Headless Debian Chromium via Selenium, its microphone fed from `capture_wav`; skips with the reason.
    network_log: keep the DevTools performance log (every request the page makes, get_log("performance"))."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
    if not (os.path.isfile(binary) and driver):
        pytest.skip("no chromium and chromedriver on this machine (apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 *([f"--use-file-for-fake-audio-capture={capture_wav}"] if capture_wav else []),
                 "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,760",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    if network_log:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    try:
        return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    except Exception as err:  # noqa: BLE001 - any start failure is a skip with its reason, never a pass
        pytest.skip(f"headless chromium did not start: {str(err).splitlines()[0]}")


def screenshot(browser, path):
    """The whole page as a PNG at `path`, or in docs/ under the same name with DOCS_SCREENSHOTS=1."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1000, height + 120)
    browser.save_screenshot(path if os.environ.get("DOCS_SCREENSHOTS") != "1"
                            else os.path.join(DOCS, os.path.basename(path)))
    browser.set_window_size(1000, 760)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wyoming_talk(port, events):
    """Send `events` to the Wyoming server on 127.0.0.1:port; every event it answers until audio-stop or info."""
    from wyoming.client import AsyncTcpClient

    async with AsyncTcpClient("127.0.0.1", port) as client:
        for event in events:
            await client.write_event(event)
        answers = []
        while True:
            event = await asyncio.wait_for(client.read_event(), 60)
            answers.append(event)
            if event is None or event.type in ("audio-stop", "info", "error"):
                return answers


def tuned_copy(voice, out, seed):
    """A voice folder like `voice` with other weights: what a feedback run leaves in final_model/."""
    model, tokenizer = models.load_voice(voice)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    models.prepare_for_training(model)
    models.export_voice(model, tokenizer, models.VitsDiscriminator(max_channels=64), out)
    return out


def fake_run(folder, input_voice, decision, seed):
    """A finished feedback run of `input_voice` whose verdict is `decision`."""
    tuned_copy(input_voice, os.path.join(folder, "final_model"), seed)
    reasons = ["keep: held-out feedback mel 2.000 -> 1.800 (-10%, must fall): 1 of 1 clips better"] if \
        decision == "keep" else ["reject: held-out original mel 1.862 -> 2.410 (+29%, limit +3%): the voice got "
                                 "worse on what it knew"]
    report = dict(status="done", model=input_voice, model_sha256=run_files.model_fingerprint(input_voice),
                  before={}, validation_mel=dict(feedback=dict(before=2.0, after=1.8, change=-0.2),
                                                 original=dict(before=1.862, after=2.41, change=0.548)),
                  quality={}, verdict=dict(decision=decision, reasons=reasons, guards={}, decided_by="guards"))
    with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)
    return folder


MMS = "facebook/mms-1b-all"


VOCABS = {"eng": ["<pad>", "<s>", "</s>", "<unk>", "|", "e", "t", "a"],
          "kmr-script_latin": ["<pad>", "<s>", "</s>", "<unk>", "|", "ê", "ç", "ş", "î", "û", "a"]}


def tiny_mms(offline_home):
    """A Wav2Vec2ForCTC with adapter layers, a nested vocabulary and one adapter file per language, laid out as
    huggingface_hub caches facebook/mms-1b-all. Returns {lang: adapter weights}."""
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(VOCABS["eng"]), hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=16, conv_dim=(8, 8), conv_stride=(5, 4),
                            conv_kernel=(10, 4), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
                            pad_token_id=0, adapter_attn_dim=4, do_stable_layer_norm=True, feat_extract_norm="layer")
    model = Wav2Vec2ForCTC(config)
    adapters = {}
    for i, (lang, letters) in enumerate(VOCABS.items()):
        torch.manual_seed(10 + i)
        weights = {k: torch.randn_like(v) for k, v in model._get_adapters().items()}
        weights["lm_head.weight"] = torch.randn(len(letters), 16)
        weights["lm_head.bias"] = torch.randn(len(letters))
        adapters[lang] = weights
    folder = os.path.join(offline_home, "build")
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({lang: {ch: i for i, ch in enumerate(letters)} for lang, letters in VOCABS.items()}, f,
                  ensure_ascii=False)
    tokenizer = Wav2Vec2CTCTokenizer(os.path.join(folder, "vocab.json"), target_lang="eng")
    tokenizer.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(folder)
    model.save_pretrained(folder)
    files = {name: (lambda p, src=os.path.join(folder, name): os.replace(src, p)) for name in os.listdir(folder)}
    for lang, weights in adapters.items():
        files[f"adapter.{lang}.safetensors"] = lambda p, w=weights: save_file(w, p)
    hub_cache(offline_home, MMS, files)
    return adapters
