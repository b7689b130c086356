"""train_feedback.py --compare RUN_DIR: a blind A/B listening test of a tuned voice against the voice it was
tuned from, served as a local page (compare_page.html) by the server both pages share (page_server.py), to
as many listeners as come, each with their own choices.

Each sentence is heard as A and B, the input voice and the tuned voice in a random order per sentence, and
the listener picks A, B or no difference. Sentences: the run's held-out feedback clips, the sentences marked
needs work and good in the listening session its feedback came from (to catch what got worse), and the
fixed evaluation sentences.

Listeners: each starts on the page with a name and gets an id the page keeps (POST /api/listeners); their
choices are theirs alone, and every address of theirs carries the id. Each listener hears the pairs with
letters of their own draw (half the pairs, rounded at random, have the tuned voice as A), so the key one
listener sees at their end says nothing of another's.

Blind: before a listener's last pair is judged, nothing their page receives tells which voice is which.
Both takes of a pair are padded with silence to one length and written as compare/audio/<pair><A|B>.wav
(16-bit PCM, one header layout), served under opaque URLs (/audio/<listener>/<pair>/<A|B>) with identical
headers; the state a page gets holds only the texts, the listener's own choices and the others' names and
progress. The keys live in compare/comparison.json, which the server never sends; a listener's key is
revealed with their result, once they have judged every pair. Every choice is saved at once, so reopening
continues.

Each time a listener finishes, report.json gets "listening": every finished listener's judgements pooled
in one two-sided exact sign test over the pairs with a preference, with each listener's own counts; the
verdict is decided again with it (verdict.reconsider: listeners decide only where they are sure), and
report.html is rewritten.
"""

import glob
import json
import os
import random
import re
import secrets
import threading
import time
from http import HTTPStatus

import numpy as np
import soundfile as sf

from voicetune.common import page_server
from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.common import speech
from voicetune.feedback import listening
from voicetune.feedback import verdict
from voicetune.night import run_report
from voicetune.voice import speak_lines
from voicetune.voice import speaking

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_page.html")
FOLDER = run_files.COMPARE  # inside the run folder: everything the comparison writes
STATE_FILE = "comparison.json"
CHOICES = ("A", "B", "same")
LISTENER_ID = "[0-9a-f]{16}"  # secrets.token_hex(8): a page keeps its own, another's is not guessed
MAX_LISTENERS = 100  # a room of listeners, not a script starting listeners in a loop
MAX_NAME_CHARS = 60


# ----------------------------------------------------------------------------------------------------
# The result: counts and the sign test (verdict.sign_test), of one listener and of all of them pooled.

def listening_result(pairs):
    """The counts, sign test and rows of judged pairs [{text, kind, tuned, choice}]."""
    per_sentence = []
    for p in pairs:
        preferred = "none" if p["choice"] == "same" else "tuned" if p["choice"] == p["tuned"] else "input"
        per_sentence.append(dict(text=p["text"], kind=p["kind"], tuned_was=p["tuned"], choice=p["choice"],
                                 preferred=preferred))
    count = {k: sum(s["preferred"] == k for s in per_sentence) for k in ("tuned", "input", "none")}
    return dict(pairs=len(pairs), tuned_preferred=count["tuned"], input_preferred=count["input"],
                no_difference=count["none"], p_value=verdict.sign_test(count["tuned"], count["input"]),
                per_sentence=per_sentence)


def pooled_result(listeners):
    """report.json's "listening" of the finished listeners [(name, finished, judged pairs)]: every judgement
    pooled in one sign test, each row naming its listener, and each listener's own counts in "listeners"."""
    pooled = listening_result([p for _, _, pairs in listeners for p in pairs])
    names = [name for name, _, pairs in listeners for _ in pairs]
    pooled["per_sentence"] = [dict(listener=name, **row) for name, row in zip(names, pooled["per_sentence"])]
    own = [(name, finished, listening_result(pairs)) for name, finished, pairs in listeners]
    pooled["listeners"] = [dict(name=name, finished=finished, **{k: r[k] for k in (
        "pairs", "tuned_preferred", "input_preferred", "no_difference", "p_value")}) for name, finished, r in own]
    return pooled


def balanced_letters(n, rng):
    """Which letter is the tuned voice in each of n pairs: A in half of them (the odd one at random), shuffled."""
    tuned_is_a = [i < n // 2 for i in range(n)]
    if n % 2:
        tuned_is_a[-1] = rng.random() < 0.5
    rng.shuffle(tuned_is_a)
    return ["A" if a else "B" for a in tuned_is_a]


# ----------------------------------------------------------------------------------------------------
# The comparison: its pairs, their audio, each listener's letters and choices, kept in compare/comparison.json.

class Comparison:
    """Pairs of {text, kind, tuned}: the takes of pair i in compare/audio/NNNA.wav and NNNB.wav, `tuned` the
    file letter of the tuned voice. Listeners of {id, name, tuned, choices, finished}: `tuned` the letter the
    tuned voice has for them in each pair (their own draw), `choices` theirs, `finished` when they judged the
    last pair (their key is known to them from then on)."""

    def __init__(self, run_dir, pairs, listeners=(), rng=None):
        self.run_dir, self.pairs, self.listeners = run_dir, pairs, list(listeners)
        self.rng = rng or random.SystemRandom()
        self.folder = os.path.join(run_dir, FOLDER)
        self.lock = threading.Lock()

    def pair(self, index):
        if not 0 <= index < len(self.pairs):
            raise page_server.UploadError(HTTPStatus.NOT_FOUND, f"no pair {index}")
        return self.pairs[index]

    def listener(self, listener_id):
        for listener in self.listeners:
            if listener["id"] == listener_id:
                return listener
        raise page_server.UploadError(HTTPStatus.NOT_FOUND, "no such listener: start as a new one")

    def audio(self, listener_id, index, letter):
        """The file of the take `listener_id` hears as `letter` in pair `index`."""
        listener, pair = self.listener(listener_id), self.pair(index)
        on_disk = letter if listener["tuned"][index] == pair["tuned"] else {"A": "B", "B": "A"}[letter]
        return os.path.join(self.folder, "audio", f"{index:03d}{on_disk}.wav")

    def state(self):
        """What any page may know: how many pairs, and each listener's name and progress; the id of those who
        have not finished, to continue as one of them (their key is not known yet)."""
        return dict(total=len(self.pairs), listeners=[
            dict(name=one["name"], judged=judged_count(one), done=one["finished"] is not None,
                 listener=None if one["finished"] else one["id"]) for one in self.listeners])

    def listener_state(self, listener_id):
        """What one listener's page may know: the texts and their own choices; their key and the result only
        once they have finished."""
        listener = self.listener(listener_id)
        done = listener["finished"] is not None
        return dict(listener=listener["id"], name=listener["name"], judged=judged_count(listener), total=len(self.pairs),
                    pairs=[dict(index=i, text=p["text"], choice=c)
                           for i, (p, c) in enumerate(zip(self.pairs, listener["choices"]))],
                    done=done, result=self.result(listener) if done else None)

    def result(self, listener):
        """The listener's own result and key, the pooled result of every finished listener and the verdict."""
        report = run_files.read_report(self.run_dir) or {}
        pooled = report.get("listening") or {}
        return dict(listening_result(self.judged(listener)), verdict=report.get("verdict"),
                    pooled={k: pooled.get(k) for k in ("pairs", "tuned_preferred", "input_preferred", "no_difference",
                                                      "p_value", "listeners")})

    def judged(self, listener):
        return [dict(text=p["text"], kind=p["kind"], tuned=tuned, choice=choice)
                for p, tuned, choice in zip(self.pairs, listener["tuned"], listener["choices"])]

    def add_listener(self, name):
        """A new listener, with the letters of their own draw; their state."""
        name = listening.plain_text(name if isinstance(name, str) else "")
        if len(name) > MAX_NAME_CHARS:
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, f"a name of at most {MAX_NAME_CHARS} characters")
        with self.lock:
            if len(self.listeners) >= MAX_LISTENERS:
                raise page_server.UploadError(HTTPStatus.CONFLICT, f"{MAX_LISTENERS} listeners already: enough")
            listener = dict(id=secrets.token_hex(8), name=name or f"listener {len(self.listeners) + 1}",
                            tuned=balanced_letters(len(self.pairs), self.rng), choices=[None] * len(self.pairs),
                            finished=None)
            self.listeners.append(listener)
            self.write()
        print(f"blind comparison: {listener['name']} starts listening")
        return self.listener_state(listener["id"])

    def choose(self, listener_id, index, choice):
        """One listener's choice, saved at once; their last one pools every finished listener's judgements into
        report.json and decides the verdict again."""
        if choice not in CHOICES:
            raise page_server.UploadError(HTTPStatus.BAD_REQUEST, f"choice must be one of {', '.join(CHOICES)}")
        with self.lock:
            listener = self.listener(listener_id)
            if listener["finished"]:
                raise page_server.UploadError(HTTPStatus.CONFLICT, "you have judged every pair: your key is known now")
            self.pair(index)
            listener["choices"][index] = choice
            if None not in listener["choices"]:
                listener["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
                self.write()
                record_result(self.run_dir, pooled_result([(one["name"], one["finished"], self.judged(one))
                                                           for one in self.listeners if one["finished"]]))
            else:
                self.write()
        return self.listener_state(listener_id)

    def write(self):
        data = dict(created_for=os.path.basename(os.path.abspath(self.run_dir)), pairs=self.pairs,
                    listeners=self.listeners)
        run_folder.write_atomically(os.path.join(self.folder, STATE_FILE),
                                    json.dumps(data, indent=2, ensure_ascii=False), durable=False)


def judged_count(listener):
    return sum(c is not None for c in listener["choices"])


def record_result(run_dir, result):
    """The verdict decided again with the pooled listening result (verdict.reconsider writes both into
    report.json), and report.html shows them."""
    decided = verdict.reconsider(run_dir, result)
    run_report.update(run_dir)
    print(f"blind comparison, {len(result['listeners'])} listener{'s' * (len(result['listeners']) != 1)} pooled: "
          f"tuned voice preferred {result['tuned_preferred']}, input voice {result['input_preferred']}, no difference "
          f"{result['no_difference']} (p = {result['p_value']:.3g}); written to "
          f"{os.path.join(run_dir, run_files.REPORT)}")
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
            comparison = Comparison(run_dir, *saved_pairs(saved))
            for i in range(len(comparison.pairs)):
                for letter in "AB":
                    on_disk = os.path.join(comparison.folder, "audio", f"{i:03d}{letter}.wav")
                    if not os.path.isfile(on_disk):
                        raise ValueError(f"{on_disk} is missing")
            if "listeners" not in saved:  # its one listener's id, kept from now on
                with comparison.lock:
                    comparison.write()
            return comparison
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise run_errors.TrainingError(f"{path}: not a comparison ({err}); move {os.path.join(run_dir, FOLDER)} "
                                           "away to start afresh") from None
    sentences = gather_sentences(run_dir, report, sessions_dir)
    takes = speak_pairs(run_dir, report, sentences, device)
    return make_comparison(run_dir, takes, rng or random.SystemRandom())


def saved_pairs(saved):
    """(pairs, listeners) of a comparison.json; ValueError for anything else. A file from before there were
    several listeners (each pair with its one choice) is its one listener's, "listener 1"."""
    pairs = [dict(text=str(p["text"]), kind=str(p["kind"]), tuned=p["tuned"]) for p in saved["pairs"]]
    listeners = saved.get("listeners")
    if listeners is None:
        listeners = [dict(id=secrets.token_hex(8), name="listener 1", tuned=[p["tuned"] for p in pairs],
                          choices=[p["choice"] for p in saved["pairs"]], finished=saved.get("finished"))]
    listeners = [dict(id=one["id"], name=str(one["name"]), tuned=list(one["tuned"]), choices=list(one["choices"]),
                      finished=one["finished"]) for one in listeners]
    if not pairs or any(p["tuned"] not in ("A", "B") for p in pairs):
        raise ValueError("a pair without its key")
    for one in listeners:
        if not (isinstance(one["id"], str) and re.fullmatch(LISTENER_ID, one["id"])) or \
                len(one["tuned"]) != len(pairs) or len(one["choices"]) != len(pairs) or \
                any(t not in ("A", "B") for t in one["tuned"]) or any(c not in CHOICES + (None,) for c in one["choices"]):
            raise ValueError(f"listener {one['name']!r} without an id, their letters or their choices")
    return pairs, listeners


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
        data = run_folder.read_json(path)
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
    """Pairs in a random order, each written as two takes of one length (padded with silence) under the
    letters of balanced_letters; no listener yet."""
    order = list(range(len(takes)))
    rng.shuffle(order)
    audio_dir = os.path.join(run_dir, FOLDER, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    pairs = []
    for index, (source, tuned) in enumerate(zip(order, balanced_letters(len(takes), rng))):
        kind, text, input_audio, tuned_audio, sr = takes[source]
        length = max(len(input_audio), len(tuned_audio))
        a, b = (tuned_audio, input_audio) if tuned == "A" else (input_audio, tuned_audio)
        for letter, audio in (("A", a), ("B", b)):
            speech.write_wav(os.path.join(audio_dir, f"{index:03d}{letter}.wav"),
                             np.pad(audio, (0, length - len(audio))), sr)
        pairs.append(dict(text=text, kind=kind, tuned=tuned))
    comparison = Comparison(run_dir, pairs, rng=rng)
    with comparison.lock:
        comparison.write()
    return comparison


# ----------------------------------------------------------------------------------------------------
# The page's routes (page_server.py checks every request and answers every refusal): the listeners, one
# listener's state, their takes by pair number and letter, their choices.

class Handler(page_server.Handler):
    page = PAGE

    def start_listener(self):
        self.send_json(self.session.add_listener(self.read_json_object('{"name": ...}').get("name")))

    def send_listener_state(self, listener):
        self.send_json(self.session.listener_state(listener))

    def send_audio(self, listener, row, letter):
        self.send_file(self.session.audio(listener, row, letter))

    def choose(self, listener, row):
        self.session.listener(listener)
        self.session.pair(row)
        self.send_json(self.session.choose(listener, row, self.read_json_object('{"choice": ...}').get("choice")))

    routes = (("GET", "/api/state", page_server.Handler.send_state),
              ("POST", "/api/listeners", start_listener),
              ("GET", f"/api/listener/(?P<listener>{LISTENER_ID})", send_listener_state),
              ("GET", f"/audio/(?P<listener>{LISTENER_ID})/{{row}}/(?P<letter>[AB])", send_audio),
              ("POST", f"/api/choose/(?P<listener>{LISTENER_ID})/{{row}}", choose))


def progress(comparison):
    """How far the listeners are, in one line."""
    state = comparison.state()
    listeners = state["listeners"]
    return (f"{state['total']} pairs, {len(listeners)} listener{'s' * (len(listeners) != 1)}"
            + "".join(f"{'; ' if i else ': '}{one['name']} " + ("finished" if one["done"] else
                                                               f"{one['judged']} judged")
                      for i, one in enumerate(listeners)))


def serve(run_dir, args, sessions_dir):
    """Hold the run folder, open (or make) its comparison and serve the page until Ctrl-C."""
    with run_folder.OutputLock(run_dir):
        comparison = open_comparison(run_dir, args.device, sessions_dir)
        server = page_server.make_server(Handler, comparison, args.host, args.port, args.allowed_host or ())
        page_server.warn_remote(server, args.host, f"hear both voices and judge the pairs, writing into {run_dir}")
        print(f"blind comparison in {os.path.join(run_dir, FOLDER)}: {progress(comparison)}")
        page_server.serve_until_interrupted(server)
        print(f"blind comparison: {progress(comparison)}; a finished listener's result is pooled into report.json; "
              f"more listeners, or one who has not finished, continue with: "
              f"{run_files.compare_command(run_dir, args.data_dir)}")
        rejected = ((run_files.read_report(run_dir) or {}).get("verdict") or {}).get("decision") == "reject"
        print(f"put it to use with: {run_files.promote_command(run_dir, args.data_dir)}"
              + (" (refused unless --force: the verdict is reject)" if rejected else ""))
