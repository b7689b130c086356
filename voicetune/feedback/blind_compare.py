"""train_feedback.py --compare RUN_DIR: a blind A/B listening test of a tuned voice against the voice it was
tuned from, served as a local page (compare_page.html) by the server both pages share (page_server.py).

Each sentence is heard as A and B, the input voice and the tuned voice in a random order per sentence, and
the listener picks A, B or no difference. Sentences: the run's held-out feedback clips, the sentences marked
needs work and good in the listening session its feedback came from (to catch what got worse), and the
fixed evaluation sentences.

Blind: before the last pair is judged, nothing the page receives tells which voice is which. Both takes of a
pair are padded with silence to one length and written as compare/audio/<pair><A|B>.wav (16-bit PCM, one
header layout), served under opaque URLs (/audio/<pair>/<A|B>) with identical headers; the state the page
gets holds only the texts and the listener's own choices; half the pairs (rounded at random) have the
tuned voice as A. The key lives in compare/comparison.json, which the server never sends; it is revealed
with the result, once every pair is judged. Every choice is saved at once, so reopening continues.

At the end report.json gets "listening" (two-sided exact sign test over the pairs with a preference), the
verdict is decided again with it (verdict.reconsider: a tune the listeners did not prefer is rejected), and
report.html is rewritten.
"""

import glob
import json
import os
import random
import threading
import time
from http import HTTPStatus

import numpy as np
import soundfile as sf

from voicetune.feedback import listening
from voicetune.feedback import page_server
from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.night import run_report
from voicetune.common import speech
from voicetune.voice import speaking
from voicetune.voice import speak_lines
from voicetune.feedback import verdict

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_page.html")
FOLDER = run_files.COMPARE  # inside the run folder: everything the comparison writes
STATE_FILE = "comparison.json"
CHOICES = ("A", "B", "same")


# ----------------------------------------------------------------------------------------------------
# The result: counts and the sign test (verdict.sign_test).

def listening_result(pairs):
    """report.json's "listening" of judged pairs [{text, kind, tuned, choice}]."""
    per_sentence = []
    for p in pairs:
        preferred = "none" if p["choice"] == "same" else "tuned" if p["choice"] == p["tuned"] else "input"
        per_sentence.append(dict(text=p["text"], kind=p["kind"], tuned_was=p["tuned"], choice=p["choice"],
                                 preferred=preferred))
    count = {k: sum(s["preferred"] == k for s in per_sentence) for k in ("tuned", "input", "none")}
    return dict(pairs=len(pairs), tuned_preferred=count["tuned"], input_preferred=count["input"],
                no_difference=count["none"], p_value=verdict.sign_test(count["tuned"], count["input"]),
                per_sentence=per_sentence)


# ----------------------------------------------------------------------------------------------------
# The comparison: its pairs, their audio, the listener's choices, kept in compare/comparison.json.

class Comparison:
    """Pairs of {text, kind, tuned: "A"|"B", choice}; the audio of pair i in compare/audio/NNNA.wav and NNNB.wav."""

    def __init__(self, run_dir, pairs, finished=None):
        self.run_dir, self.pairs, self.finished = run_dir, pairs, finished
        self.folder = os.path.join(run_dir, FOLDER)
        self.lock = threading.Lock()

    def pair(self, index):
        if not 0 <= index < len(self.pairs):
            raise page_server.UploadError(HTTPStatus.NOT_FOUND, f"no pair {index}")
        return self.pairs[index]

    def audio(self, index, letter):
        self.pair(index)
        return os.path.join(self.folder, "audio", f"{index:03d}{letter}.wav")

    def state(self):
        """What the page may know: texts and the listener's choices; the key and result only once finished."""
        judged = sum(p["choice"] is not None for p in self.pairs)
        return dict(pairs=[dict(index=i, text=p["text"], choice=p["choice"]) for i, p in enumerate(self.pairs)],
                    judged=judged, total=len(self.pairs), done=self.finished is not None,
                    result=self.result() if self.finished else None)

    def result(self):
        listened = listening_result(self.pairs)
        report = run_files.read_report(self.run_dir) or {}
        return dict(listened, verdict=report.get("verdict"))

    def choose(self, index, choice):
        if choice not in CHOICES:
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, f"choice must be one of {', '.join(CHOICES)}")
        with self.lock:
            if self.finished:
                raise page_server.UploadError(HTTPStatus.CONFLICT, "the comparison is finished: its key is known now")
            self.pair(index)["choice"] = choice
            if all(p["choice"] is not None for p in self.pairs):
                self.finished = time.strftime("%Y-%m-%d %H:%M:%S")
                self.write()
                record_result(self.run_dir, listening_result(self.pairs))
            else:
                self.write()
        return self.state()

    def write(self):
        data = dict(created_for=os.path.basename(os.path.abspath(self.run_dir)), finished=self.finished,
                    pairs=self.pairs)
        run_folder.write_atomically(os.path.join(self.folder, STATE_FILE),
                                    json.dumps(data, indent=2, ensure_ascii=False), durable=False)


def record_result(run_dir, result):
    """The verdict decided again with the listening result (verdict.reconsider writes both into report.json),
    and report.html shows them."""
    decided = verdict.reconsider(run_dir, result)
    run_report.update(run_dir)
    print(f"blind comparison: tuned voice preferred {result['tuned_preferred']}, input voice "
          f"{result['input_preferred']}, no difference {result['no_difference']} (p = {result['p_value']:.3g}); "
          f"written to {os.path.join(run_dir, run_files.REPORT)}")
    print(verdict.summary(decided))


# ----------------------------------------------------------------------------------------------------
# Opening a comparison: from comparison.json when there is one, else made from the run.

def finished_report(run_dir):
    report = run_files.read_report(run_dir)
    if report is None or report.get("status") != "done":
        raise run_errors.TrainingError(f"--compare {run_dir}: no finished feedback run there (report.json with "
                                       "status done): compare once train_feedback.py has finished")
    if not os.path.isdir(os.path.join(run_dir, run_files.FINAL_MODEL)):
        raise run_errors.TrainingError(f"--compare {run_dir}: its tuned voice (final_model/) is missing")
    return report


def open_comparison(run_dir, device="cpu", sessions_dir=None, rng=None):
    """The comparison in RUN_DIR/compare, made now when there is none (its sentences spoken by both voices)."""
    report = finished_report(run_dir)
    path = os.path.join(run_dir, FOLDER, STATE_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            pairs = [dict(text=str(p["text"]), kind=str(p["kind"]), tuned=p["tuned"], choice=p["choice"])
                     for p in saved["pairs"]]
            if not pairs or any(p["tuned"] not in ("A", "B") or p["choice"] not in CHOICES + (None,) for p in pairs):
                raise ValueError("a pair without its key or with another choice")
            comparison = Comparison(run_dir, pairs, saved.get("finished"))
            for i in range(len(pairs)):
                for letter in "AB":
                    if not os.path.isfile(comparison.audio(i, letter)):
                        raise ValueError(f"{comparison.audio(i, letter)} is missing")
            return comparison
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise run_errors.TrainingError(f"{path}: not a comparison ({err}); move {os.path.join(run_dir, FOLDER)} "
                                           "away to start afresh") from None
    sentences = gather_sentences(run_dir, report, sessions_dir)
    takes = speak_pairs(run_dir, report, sentences, device)
    return make_comparison(run_dir, takes, rng or random.SystemRandom())


def gather_sentences(run_dir, report, sessions_dir):
    """[(kind, text, input wav or None, tuned wav or None)]: the held-out feedback clips and the evaluation
    sentences as the run spoke them before and after; the session's marked sentences, to be spoken."""
    samples = report.get("samples") or {}
    feedback = report.get("feedback") or {}

    def spoken(kind, name):
        return tuple(os.path.join(run_dir, run_files.SAMPLES, when, kind, name)
                     for when in (run_files.BEFORE, run_files.AFTER))

    out = []
    for clip in feedback.get("held_out_clips") or []:
        name = run_files.sample_name(clip)
        if name in (samples.get("feedback") or {}):
            out.append(("held_out", samples["feedback"][name], *spoken(run_files.FEEDBACK_SAMPLES, name)))
    for row in session_rows(feedback.get("dir"), sessions_dir):
        out.append((row["mark"], row["text"], None, None))
    for name, text in (samples.get("eval") or {}).items():
        out.append(("eval", text, *spoken(run_files.EVAL_SAMPLES, name)))
    return out


def session_rows(feedback_dir, sessions_dir):
    """The marked rows of the newest listening session whose corrections went to `feedback_dir` (its
    session.json lies in that folder itself, or in a folder under `sessions_dir`)."""
    if not feedback_dir:
        return []
    candidates = [os.path.join(feedback_dir, listening.SESSION_FILE)]
    if sessions_dir:
        candidates += glob.glob(os.path.join(sessions_dir, "*", listening.SESSION_FILE))
    found = []
    for path in candidates:
        data = run_files.read_json(path)
        if data and isinstance(data.get("feedback_dir"), str) and \
                os.path.realpath(data["feedback_dir"]) == os.path.realpath(feedback_dir):
            found.append((os.path.getmtime(path), path, data))
    if not found:
        return []
    _, path, data = max(found)
    rows = [r for r in data.get("sentences") or [] if isinstance(r, dict) and r.get("mark") in ("needs_work", "good")
            and isinstance(r.get("text"), str)]
    print(f"listening session {os.path.dirname(path)}: {len(rows)} marked sentences")
    return rows


def speak_pairs(run_dir, report, sentences, device):
    """[(kind, text, input audio, tuned audio)]: the run's own samples, and the rest spoken now by both voices
    with the same noise. A sentence twice (a held-out clip also marked in the session) is kept once."""
    tuned_dir = os.path.join(run_dir, run_files.FINAL_MODEL)
    _, vocab = speech.load_vocab(tuned_dir)
    seen, kept, to_speak = set(), [], []
    for kind, text, before, after in sentences:
        cleaned, reason = speech.clean_text(text, vocab)
        if reason or cleaned in seen:
            if reason:
                print(f"left out ({reason}): {listening.plain_text(text)}")
            continue
        if before is not None and not (os.path.isfile(before) and os.path.isfile(after)):
            continue
        seen.add(cleaned)
        kept.append([kind, text, before, after])
        if before is None:
            to_speak.append((len(kept) - 1, cleaned))
    if to_speak:
        spoken = os.path.join(run_dir, FOLDER, "spoken")
        for which, folder in (("input", report.get("model")), ("tuned", tuned_dir)):
            try:
                voice = speaking.TorchVoice.load(folder, report.get("speaker_id"), device, speaking.SAMPLE_MAX_SECONDS)
            except (OSError, ValueError) as err:
                print(f"the input voice {folder} cannot be loaded ({err}): the session's sentences are left out")
                kept = [k for k in kept if k[2] is not None]
                break
            print(f"speaking {len(to_speak)} sentences with the {which} voice {folder} ...")
            named = [(run_files.sentence_sample(n), text) for n, (_, text) in enumerate(to_speak)]
            paths = speak_lines.speak_files(voice, named, os.path.join(spoken, which))
            for (i, _), wav in zip(to_speak, paths):
                kept[i][2 if which == "input" else 3] = wav
    if not kept:
        raise run_errors.TrainingError(f"--compare {run_dir}: no sentence to compare (no held-out clip, session "
                                       "sentence or evaluation sample)")
    rate = sf.info(kept[0][3]).samplerate
    return [(kind, text, speech.load_audio(a, rate), speech.load_audio(b, rate), rate) for kind, text, a, b in kept]


def make_comparison(run_dir, takes, rng):
    """Pairs in a random order, the tuned voice as A in half of them (the odd one at random), both takes of
    a pair padded with silence to one length and written alike."""
    order = list(range(len(takes)))
    rng.shuffle(order)
    tuned_is_a = [i < len(takes) // 2 for i in range(len(takes))]
    if len(takes) % 2:
        tuned_is_a[-1] = rng.random() < 0.5
    rng.shuffle(tuned_is_a)
    audio_dir = os.path.join(run_dir, FOLDER, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    pairs = []
    for index, (source, a_is_tuned) in enumerate(zip(order, tuned_is_a)):
        kind, text, input_audio, tuned_audio, sr = takes[source]
        length = max(len(input_audio), len(tuned_audio))
        a, b = (tuned_audio, input_audio) if a_is_tuned else (input_audio, tuned_audio)
        for letter, audio in (("A", a), ("B", b)):
            speech.write_wav(os.path.join(audio_dir, f"{index:03d}{letter}.wav"),
                             np.pad(audio, (0, length - len(audio))), sr)
        pairs.append(dict(text=text, kind=kind, tuned="A" if a_is_tuned else "B", choice=None))
    comparison = Comparison(run_dir, pairs)
    with comparison.lock:
        comparison.write()
    return comparison


# ----------------------------------------------------------------------------------------------------
# The page's routes (page_server.py checks every request and answers every refusal): the state, the takes
# by pair number and letter, the choices.

class Handler(page_server.Handler):
    page = PAGE

    def send_audio(self, row, letter):
        self.send_file(self.session.audio(row, letter))

    def choose(self, row):
        self.session.pair(row)
        self.send_json(self.session.choose(row, self.read_json_object('{"choice": ...}').get("choice")))

    routes = (("GET", "/api/state", page_server.Handler.send_state),
              ("GET", "/audio/{row}/(?P<letter>[AB])", send_audio),
              ("POST", "/api/choose/{row}", choose))


def serve(run_dir, args, sessions_dir):
    """Hold the run folder, open (or make) its comparison and serve the page until Ctrl-C."""
    with run_folder.OutputLock(run_dir):
        comparison = open_comparison(run_dir, args.device, sessions_dir)
        server = page_server.make_server(Handler, comparison, args.host, args.port, args.allowed_host or ())
        page_server.warn_remote(server, args.host, f"hear both voices and judge the pairs, writing into {run_dir}")
        state = comparison.state()
        print(f"blind comparison: {state['total']} pairs in {os.path.join(run_dir, FOLDER)}, {state['judged']} judged"
              + (" (finished)" if state["done"] else ""))
        page_server.serve_until_interrupted(server)
        state = comparison.state()
        print(f"{state['judged']} of {state['total']} pairs judged"
              + ("; the result is in report.json" if state["done"] else
                 f"; continue with: python train_feedback.py --compare {run_dir}"))
