"""The listening queue: which sentences a listening session offers, ranked by what the voice most likely says
badly, and whether that ranking earns its place.

The pool: the transcripts of the training set's held-out clips, the user's --pool files and the shipped
examples/sentences.txt; less what is recorded already or was marked good for this voice. The scores
(docs/feedback.md): rarity (letters, letter pairs and number words the training transcripts hold fewer than
RARE_BELOW times), instability (the spread of the predicted durations over SEEDS noise draws; with --asr_model
also the spread of the recogniser's character error rate), intelligibility (with --asr_model: the character
error rate of the voice's own rendition) and history (likeness to sentences marked needs work before). A
sentence ranks by its best place in any one score's order (the first of each, then the second of each, ...);
that score is its reason.

One sentence in five of a session drawn from the pool is a control, drawn at random from the pool's rest and
shown like any other; the marks of ranked against control sentences, session by session, say whether the
ranking finds the sentences the voice says badly (report.json of each session, and its page).
"""

import csv
import glob
import json
import os
import random
import tempfile
import zlib

import torch

from voicetune.common import kurmanji_text
from voicetune.common import run_files
from voicetune.common import speech
from voicetune.feedback import feedback_run
from voicetune.feedback import verdict
from voicetune.night import clip_data
from voicetune.voice import speak_lines
from voicetune.voice import speaking
from voicetune.voice import voice_quality

EXAMPLES = os.path.join(run_files.REPOSITORY, run_files.SENTENCES)
CONTROL_SHARE = 0.2
SEEDS = 4  # noise draws of the duration predictor per sentence
ASR_SEEDS = 2  # renditions per sentence heard by the recogniser (each is a whole synthesis)
ASR_SHORTLIST = 3  # with --asr_model, the recogniser hears this many times the session's size, best first
RARE_BELOW = 3  # a unit the training transcripts hold fewer times than this is rare
NEAR_DUPLICATE = 0.6  # letter-trigram Jaccard likeness above which two sentences count as one
SIGNALS = ("rarity", "instability", "history", "cer", "cer_spread")
COLUMNS = ("id", "sentence", "rank", "role", "reason") + SIGNALS


# ----------------------------------------------------------------------------------------------------
# The pool.

def key(text):
    """What two writings of one sentence share: lowercase letters, one space between words."""
    return voice_quality.cer_text(text)


def read_lines(path):
    with open(path, encoding="utf-8-sig") as f:
        return [" ".join(line.split()) for line in f if line.strip()]


def training_texts(data_dir, val_size):
    """(training transcripts, held-out transcripts) of DATA_DIR/metadata.csv, split as train_vits.py splits
    them (clip_data.held_out_indices); ([], []) without one."""
    path = os.path.join(data_dir, "metadata.csv")
    if not os.path.isfile(path):
        return [], []
    rows = speech.read_metadata(path)
    held = set(clip_data.held_out_indices([name for name, _ in rows], val_size))
    return [t for i, (_, t) in enumerate(rows) if i not in held], [t for i, (_, t) in enumerate(rows) if i in held]


def heard_before(sessions_dir, feedback_dir, voice):
    """(keys of sentences to leave out: recorded, or marked good for `voice`; texts marked needs work before)."""
    done, needs_work = set(), []
    if os.path.isdir(feedback_dir):
        done |= {key(text) for _, text in feedback_run.read_pairs(feedback_dir)[0]}
        if os.path.isfile(os.path.join(feedback_dir, "metadata.csv")):
            done |= {key(text) for _, text in speech.read_metadata(os.path.join(feedback_dir, "metadata.csv"))}
    for path in glob.glob(os.path.join(sessions_dir, "*", run_files.SESSION)):
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            rows = [r for r in saved["sentences"] if isinstance(r, dict) and isinstance(r.get("text"), str)]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        same_voice = os.path.abspath(str(saved.get("voice"))) == os.path.abspath(voice)
        for r in rows:
            if r.get("saved") or (r.get("mark") == "good" and same_voice):
                done.add(key(r["text"]))
            if r.get("mark") == "needs_work":
                needs_work.append(r["text"])
    return done, needs_work


def build_pool(sources, vocab, done):
    """[{sentence, reads, source}] of every (source, line) the voice can say, each sentence once, less `done`."""
    pool, seen = [], set(done)
    for source, line in sources:
        reads, reason = speech.clean_text(line, vocab)
        if reason or key(line) in seen:
            continue
        seen.add(key(line))
        pool.append(dict(sentence=line, reads=reads, source=source))
    return pool


# ----------------------------------------------------------------------------------------------------
# The scores.

def letter_pairs(word):
    return {word[i:i + 2] for i in range(len(word) - 1)}


def number_words(line):
    """The words the numbers written with digits in `line` are read as."""
    words = set()
    for match in kurmanji_text.NUMBER.finditer(line):
        try:
            words |= set(kurmanji_text.read_number(match, kurmanji_text.READINGS).split())
        except (kurmanji_text.Unreadable, KeyError):
            continue
    return words


def units(reads, line):
    """The letters, letter pairs and number words of a sentence (its cleaned text, and the line as written)."""
    words = [w for w in key(reads).split() if w]
    found = {ch for w in words for ch in w}
    for w in words:
        found |= letter_pairs(w)
    return found | {f"«{w}»" for w in number_words(line)}


def unit_counts(texts, vocab):
    """How often the training transcripts hold each letter, letter pair and word (number words among them)."""
    counts = {}
    for text in texts:
        reads, reason = speech.clean_text(text, vocab)
        if reason:
            continue
        words = key(reads).split()
        for unit in [ch for w in words for ch in w] + [p for w in words for p in
                                                       (w[i:i + 2] for i in range(len(w) - 1))] + \
                [f"«{w}»" for w in words]:
            counts[unit] = counts.get(unit, 0) + 1
    return counts


def rarity(candidate, counts):
    """(share of the sentence's units held fewer than RARE_BELOW times, those units: rarest first, letters
    before number words before letter pairs)."""
    found = units(candidate["reads"], candidate["sentence"])
    kind = {1: 0, 2: 2}
    rare = sorted((u for u in found if counts.get(u, 0) < RARE_BELOW),
                  key=lambda u: (counts.get(u, 0), kind.get(len(u), 1), u))
    return (len(rare) / len(found) if found else 0.0), rare


def trigrams(text):
    padded = f" {key(text)} "
    return {padded[i:i + 3] for i in range(len(padded) - 2)}


def bigrams(text):
    padded = f" {key(text)} "
    return {padded[i:i + 2] for i in range(len(padded) - 1)}


def jaccard(a, b):
    return len(a & b) / len(a | b) if a or b else 0.0


def history(candidate, needs_work_bigrams):
    """(likeness to the nearest sentence marked needs work before: letter-bigram Jaccard, that sentence)."""
    mine = bigrams(candidate["sentence"])
    best = max(((jaccard(mine, b), text) for text, b in needs_work_bigrams), default=(0.0, None))
    return best


def seed_of(text):
    return zlib.crc32(text.encode("utf-8"))


@torch.no_grad()
def duration_spread(model, token_ids, speaker_id=None, seeds=SEEDS):
    """How unsure the duration predictor is of a sentence: over `seeds` noise draws (seeded by the text, so a
    sentence scores the same in any pool), the mean per-token spread (std) of the predicted frames over the
    mean predicted frames. 0 for a predictor that is sure (no noise: noise_scale_duration 0)."""
    ids = torch.tensor([token_ids], device=model.device)
    mask = torch.ones_like(ids).unsqueeze(-1).to(model.text_encoder.embed_tokens.weight.dtype)
    hidden = model.text_encoder(input_ids=ids, padding_mask=mask, return_dict=True).last_hidden_state
    hidden, mask = hidden.transpose(1, 2).repeat(seeds, 1, 1), mask.transpose(1, 2).repeat(seeds, 1, 1)
    speaker = None
    if speaker_id is not None and model.config.num_speakers > 1:
        speaker = model.embed_speaker(torch.full((seeds,), speaker_id, device=model.device)).unsqueeze(-1)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed_of(" ".join(map(str, token_ids))))
        if model.config.use_stochastic_duration_prediction:
            log_duration = model.duration_predictor(hidden, mask, speaker, reverse=True,
                                                    noise_scale=model.noise_scale_duration)
        else:
            log_duration = model.duration_predictor(hidden, mask, speaker)
    frames = torch.exp(log_duration)[:, 0].float() / model.speaking_rate  # [seeds, tokens], as VitsModel scales
    return float(frames.std(0).mean() / frames.mean().clamp(min=1e-6)) if seeds > 1 else 0.0


def asr_scores(model, tokenizer, speaker_id, candidates, asr_model, asr_lang):
    """Fill each candidate's cer (mean over ASR_SEEDS renditions) and cer_spread (their std)."""
    voice = speaking.TorchVoice(model, tokenizer, speaker_id, speaking.SAMPLE_MAX_SECONDS)
    with tempfile.TemporaryDirectory() as tmp:
        for i, c in enumerate(candidates):
            paths = [speak_lines.speak_files(voice, [(f"{i}_{k}.wav", c["reads"])], tmp, seed_of(c["reads"]) + k)[0]
                     for k in range(ASR_SEEDS)]
            heard = voice_quality.transcribe(paths, asr_model, asr_lang)
            rates = torch.tensor([voice_quality.character_error_rate([c["reads"]], [h]) for h in heard])
            c["cer"], c["cer_spread"] = float(rates.mean()), float(rates.std(unbiased=False))


def places(values):
    """Each value's place when the values above 0 are put highest first (1 first, equal values the same
    place); None for 0 or None (not measured): that signal says nothing of it."""
    ordered = sorted({v for v in values if v}, reverse=True)
    place = {v: i for i, v in enumerate(ordered, 1)}
    return [place.get(v) if v else None for v in values]


def reason_words(candidate, signal):
    if signal == "rarity":
        return "rare in the training set: " + ", ".join(candidate["rare"][:4])
    if signal == "instability":
        return f"unsure durations (spread {candidate['instability']:.2f})"
    if signal == "history":
        return f"like one marked needs work: {candidate['like']}"
    if signal == "cer":
        return f"the recogniser misheard it (CER {candidate['cer']:.2f})"
    return f"heard differently from take to take (CER spread {candidate['cer_spread']:.2f})"


def rank(candidates):
    """The candidates, best first: each by its best place in any one signal's order (the first of every signal,
    then the second of every signal, ...: no one signal fills the queue), ties by the sum of its places, then
    the text; its `reason` that signal in words, its `rank` its place in the queue (1 first)."""
    table = {s: places([c.get(s) for c in candidates]) for s in SIGNALS}
    last = len(candidates) + 1
    for i, c in enumerate(candidates):
        mine = {s: table[s][i] or last for s in SIGNALS}
        c["signal"] = min(SIGNALS, key=lambda s: (mine[s], SIGNALS.index(s)))
        c["order"] = (mine[c["signal"]], sum(mine.values()), c["sentence"])
        c["reason"] = reason_words(c, c["signal"])
    ranked = sorted(candidates, key=lambda c: c["order"])
    for place, c in enumerate(ranked, 1):
        c["rank"] = place
    return ranked


def score(candidates, model, tokenizer, vocab, training, needs_work, speaker_id=None):
    """Every candidate's cheap scores (rarity against `training` transcripts, instability, history); in place."""
    counts = unit_counts(training, vocab)
    needs_work_bigrams = [(text, bigrams(text)) for text in needs_work]
    for c in candidates:
        c["rarity"], c["rare"] = rarity(c, counts)
        c["history"], c["like"] = history(c, needs_work_bigrams)
        c["instability"] = duration_spread(model, speech.token_ids(tokenizer, c["reads"]), speaker_id)
        c["cer"] = c["cer_spread"] = None


# ----------------------------------------------------------------------------------------------------
# A session's sentences.

def near_duplicate(candidate, chosen):
    mine = trigrams(candidate["sentence"])
    return any(jaccard(mine, trigrams(c["sentence"])) > NEAR_DUPLICATE for c in chosen)


def choose(ranked, size, rng):
    """The session: the best `size - controls` of `ranked` and round(size x CONTROL_SHARE) controls drawn at
    random from the rest, each at a random place among them; near-duplicates of a chosen one are skipped."""
    controls = round(size * CONTROL_SHARE) if size > 1 else 0
    chosen = []
    for c in ranked:
        if len(chosen) == size - controls:
            break
        if not near_duplicate(c, chosen):
            chosen.append(dict(c, role="ranked"))
    rest = [c for c in ranked if not any(c["sentence"] == p["sentence"] for p in chosen)]
    rng.shuffle(rest)
    drawn = []
    for c in rest:
        if len(drawn) == controls:
            break
        if not near_duplicate(c, chosen + drawn):
            drawn.append(dict(c, role="control"))
    for c in drawn:
        chosen.insert(rng.randint(0, len(chosen)), c)
    return chosen


def build(args, model, tokenizer, vocab, speaker_id, lines=None):
    """The session's rows, ranked and scored: of `lines` (a sentence file: all of them, no control), else of
    the pool (args.listen_count of them, one in five a control)."""
    sessions_dir = os.path.join(args.data_dir, run_files.SESSIONS)
    training, held_out = training_texts(args.data_dir, args.val_size)
    done, needs_work = heard_before(sessions_dir, args.feedback_dir, args.model)
    if lines is not None:
        candidates = build_pool([("file", line) for line in lines], vocab, set())
    else:
        sources = [("held out", t) for t in held_out]
        for path in args.pool or []:
            sources += [(path, line) for line in read_lines(path)]
        sources += [("examples", line) for line in read_lines(EXAMPLES)]
        candidates = build_pool(sources, vocab, done)
    score(candidates, model, tokenizer, vocab, training, needs_work, speaker_id)
    size = len(candidates) if lines is not None else args.listen_count
    if args.asr_model:
        shortlist = rank(candidates)[:ASR_SHORTLIST * size]
        asr_scores(model, tokenizer, speaker_id, shortlist, args.asr_model, args.asr_lang)
    ranked = rank(candidates)
    if lines is not None:
        return [dict(c, role="ranked") for c in ranked]
    return choose(ranked, size, random.Random())


def write(folder, rows):
    """FOLDER/queue.tsv: each row's id, sentence, rank in the pool, role (ranked or control), reason and scores."""
    with open(os.path.join(folder, run_files.QUEUE), "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f, delimiter="\t", lineterminator="\n")
        out.writerow(COLUMNS)
        for r in rows:
            out.writerow([r["id"], r["sentence"], r["rank"], r["role"], r["reason"]]
                         + ["" if r.get(s) is None else f"{r[s]:.4f}" for s in SIGNALS])


def read(folder):
    """{id: row} of FOLDER/queue.tsv; {} without one."""
    path = os.path.join(folder, run_files.QUEUE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f, delimiter="\t")}


# ----------------------------------------------------------------------------------------------------
# Its worth: the needs-work rate of ranked against control sentences.

def rate(rows, role):
    heard = [r for r in rows if r["role"] == role and r["mark"] in ("good", "needs_work")]
    needs_work = sum(r["mark"] == "needs_work" for r in heard)
    return dict(heard=len(heard), needs_work=needs_work, rate=needs_work / len(heard) if heard else None)


def session_figures(folder):
    """{session, ranked, control} of a session with controls (None otherwise): each role's heard sentences,
    how many of them were marked needs work, and the rate."""
    queued = read(folder)
    try:
        with open(os.path.join(folder, run_files.SESSION), encoding="utf-8") as f:
            marks = {r["id"]: r.get("mark") for r in json.load(f)["sentences"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    rows = [dict(role=q["role"], mark=marks.get(i)) for i, q in queued.items()]
    if not any(r["role"] == "control" for r in rows):
        return None
    return dict(session=os.path.basename(os.path.abspath(folder)), ranked=rate(rows, "ranked"),
                control=rate(rows, "control"))


def worth(folder, sessions_dir):
    """The queue's figures over the sessions under `sessions_dir` and `folder`, oldest first: each session's
    rates, both pooled, and a sign test over the sessions (the ranked rate above the control rate, or below)
    once SURE_CLIPS sessions have both rates."""
    folders = sorted({os.path.abspath(f) for f in glob.glob(os.path.join(sessions_dir, "*"))
                      if os.path.isfile(os.path.join(f, run_files.QUEUE))} | {os.path.abspath(folder)})
    sessions = [s for s in map(session_figures, folders) if s]
    pooled = {role: rate([dict(role=role, mark=m) for s in sessions for m in
                          ["needs_work"] * s[role]["needs_work"] + ["good"] * (s[role]["heard"] - s[role]["needs_work"])],
                         role) for role in ("ranked", "control")}
    judged = [s for s in sessions if s["ranked"]["rate"] is not None and s["control"]["rate"] is not None]
    higher = sum(s["ranked"]["rate"] > s["control"]["rate"] for s in judged)
    lower = sum(s["ranked"]["rate"] < s["control"]["rate"] for s in judged)
    test = None
    if len(judged) >= verdict.SURE_CLIPS:
        test = dict(sessions=len(judged), ranked_higher=higher, ranked_lower=lower, p_value=verdict.sign_test(higher, lower))
    return dict(sessions=sessions, pooled=pooled, sign_test=test,
                line=worth_line(pooled, test, len(judged)))


def worth_line(pooled, test, judged):
    def said(r):
        return "none heard" if r["rate"] is None else f"{r['needs_work']} of {r['heard']} ({r['rate']:.0%})"
    line = f"needs work: ranked {said(pooled['ranked'])}, control {said(pooled['control'])}"
    if test is None:
        more = verdict.SURE_CLIPS - judged
        return line + f"; a sign test after {more} more session{'s' * (more != 1)} with both marked"
    return (line + f"; sessions where the ranked rate was higher: {test['ranked_higher']}, lower: "
            f"{test['ranked_lower']} (two-sided sign test p = {test['p_value']:.3g})")


def write_report(folder, sessions_dir):
    """FOLDER/report.json: {"queue": worth(...)}, rewritten with every mark."""
    run_files.write_report(folder, dict(queue=worth(folder, sessions_dir)))
