"""Improve a trained VITS voice in minutes from listening-session recordings, without forgetting the rest.

After train_vits.py, native speakers listen to the voice, note the sentences it says badly and record how
they should sound. This script fine-tunes the voice on those feedback clips, replaying clips of the
original training set in every batch (--replay_ratio) so the few clips do not drag the voice away from
everything else it learned. The input model is never written to: the tuned voice goes to a new folder
with its discriminator, report.json (validation mel loss on held-out original and feedback clips,
before and after) and listening samples of every feedback sentence, before and after, side by side.

It trains with the same modules as train_vits.py (the training step, preload, AMP, progress bar,
checkpoints, resume and time budget); every training flag of train_vits.py means the same here.

Examples:

    # 1. a listening-session kit: the current voice speaks each sentence, sNNN.txt holds what to record
    python train_feedback.py --make_session sentences.txt            # -> training/sessions/<date>/

    # or the same in a local web page: hear each sentence, mark it, record corrections straight into
    # training/feedback (open the printed http://127.0.0.1:8000/ address; --listen alone continues)
    python train_feedback.py --listen sentences.txt

    # 2. after recording corrections into training/feedback (NAME.wav + NAME.txt pairs, as a recording
    #    app saves them, or any audio + metadata.csv of filename|text rows, which wins when both exist):
    python train_feedback.py                                         # 30 minutes, new folder under
                                                                     # training/feedback_models/
    python train_feedback.py --feedback_dir training/sessions/2026-11-25 --target_minutes 10

    # continue an interrupted feedback run (the newest one under training/feedback_models/)
    python train_feedback.py --resume auto

    # a tiny CPU smoke run: train_vits.py's tiny run, then NAME.wav + NAME.txt pairs in example_run/feedback
    python train_feedback.py --model example_run/final_model --data_dir example_run/data \\
        --feedback_dir example_run/feedback --output_dir example_run/feedback_run --max_steps 4 \\
        --device cpu --batch_size 2 --grad_accum 1 --feedback_weight 1 --disc_channels 64
"""

import argparse
import glob
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import soundfile as sf
import torch

import blind_compare
import checkpoints
import clip_data
import distributed
import listening
import loop
import models
import planning
import run_errors
import run_folder
import run_report
import speakers
import spectrogram
import speech
import training_flags
import vits_trainer
import voice_quality

DEFAULT_FEEDBACK_DIR = os.path.join("training", "feedback")
FEEDBACK_MODELS_DIR = os.path.join("training", "feedback_models")
SESSIONS_DIR = os.path.join("training", "sessions")
REPORT_NAME = "report.json"
# Files of a feedback folder that are recordings: every format soundfile reads, by extension.
AUDIO_EXTENSIONS = {f".{fmt.lower()}" for fmt in sf.available_formats()} | {".opus", ".oga", ".aif"}
# Voice-quality measures compared before/after in report.json (see voice_quality.evaluate_quality).
QUALITY_KEYS = {"mcd": "MCD-DTW, dB (lower is better)", "dur_ratio": "duration ratio, spoken / recorded (1 is right)",
                "dnsmos_ovrl": "DNSMOS OVRL (higher is better)"}
# Flags a resumed feedback run keeps besides train_vits.py's: they decide which clips make up each batch.
RESUME_FIXED = checkpoints.RESUME_FIXED + ("replay_ratio", "feedback_weight")


# ----------------------------------------------------------------------------------------------------
# Flags: train_vits.py's parser with defaults for a short fine-tune, plus the feedback flags.

def build_parser():
    p = training_flags.build_parser(__doc__)
    p.set_defaults(model=os.path.join("training", "final_model"), lr=1e-5, warmup_steps=20, output_dir=None,
                   target_hours=None, val_size=100, benchmark_samples=50)
    g = p.add_argument_group("feedback")
    g.add_argument("--feedback_dir", default=DEFAULT_FEEDBACK_DIR,
                   help="Folder with the recorded clips (WAV, FLAC, OGG, MP3; any rate, mono or stereo), each "
                        "with its text: NAME.wav + NAME.txt, or a metadata.csv of filename|text rows (which wins "
                        "when both exist). (default: %(default)s)")
    g.add_argument("--replay_ratio", type=float, default=0.5,
                   help="Share of every batch taken from the original training set (--data_dir), so the voice "
                        "does not forget it; 0 trains on feedback alone. (default: %(default)s)")
    g.add_argument("--feedback_weight", type=float, default=50.0,
                   help="Times each feedback clip is used per epoch, where each replayed clip is used at most "
                        "once: how much more a feedback clip counts than a replayed one. Also sets the epoch "
                        "length: clips x weight / (1 - replay_ratio) items. (default: %(default)s)")
    g.add_argument("--target_minutes", type=float, default=None,
                   help="Wall-clock budget of the whole run in minutes, samples and report included; "
                        "replaces --target_hours. (default: 30)")
    g.add_argument("--speaker_id", type=int, default=None, metavar="ID",
                   help="For a multi-speaker voice (train_vits.py --speakers): whose voice the feedback clips "
                        "train and the samples, the session kit and the listening page speak with; replayed clips "
                        "keep their own speakers, and the tuned voice keeps them all. Ids and their Common Voice "
                        "client_ids are in speakers.json beside --model. (default: the speaker with the most "
                        "clips)")
    g.add_argument("--make_session", default=None, metavar="SENTENCES.txt",
                   help="Only make a listening-session kit: speak each sentence (one a line) with --model into "
                        "--output_dir (default training/sessions/<date>/) with sNNN.txt, the text of each, "
                        "then exit.")
    g = p.add_argument_group("blind comparison")
    g.add_argument("--compare", default=None, metavar="RUN_DIR",
                   help="Only serve a blind A/B listening test of the feedback run in RUN_DIR: each sentence (its "
                        "held-out feedback clips, the sentences marked in the listening session its feedback came "
                        "from, the evaluation sentences) spoken by the input voice and the tuned voice as A and B "
                        "in a random order; which is which is shown once every pair is judged. The result goes "
                        "into RUN_DIR/report.json and the verdict. Served like --listen (--host, --port, "
                        "--allow_remote); running it again continues.")
    g = p.add_argument_group("listening session")
    g.add_argument("--listen", nargs="?", const="", default=None, metavar="SENTENCES.txt|SESSION",
                   help="Only serve the listening-session page: hear --model say each sentence, mark it, record "
                        "corrections into --feedback_dir. A sentence file starts a new session (a --make_session "
                        "kit); a kit or session folder continues it; no value: the newest session.")
    g.add_argument("--host", default="127.0.0.1",
                   help="Address the page is served on; another than this machine's needs --allow_remote.")
    g.add_argument("--port", type=int, default=8000, help="Port of the page (0: any free port).")
    g.add_argument("--allow_remote", action="store_true",
                   help="Allow a --host other machines can reach. There is no password and the page is plain "
                        "http: anyone on the network who can reach the port can hear the voice, mark the "
                        "sentences and save recordings into --feedback_dir. Requests are still answered only "
                        "when they name this machine (an IP address, localhost, this machine's host names, or "
                        "an --allowed_host), so a web site cannot reach the page by pointing its own domain "
                        "name at this machine (DNS rebinding), and other sites' pages cannot post to it.")
    g.add_argument("--allowed_host", action="append", default=None, metavar="NAME",
                   help="With --allow_remote: one more name the page may be opened under, such as a DNS name "
                        "or alias of this machine (repeatable). Requests naming any other host are refused.")
    # The new run folder is only decided after parsing (a timestamp, or the run --resume names).
    for action in p._actions:
        if action.dest == "output_dir":
            action.help = ("Where the tuned model, report.json, samples/ and checkpoints/ go; never inside "
                           "--model. (default: a new folder training/feedback_models/<date-time>)")
        elif action.dest == "target_hours":
            action.help = "Wall-clock budget in hours, instead of --target_minutes."
        elif action.dest == "model":
            action.help = "The trained voice to improve (a folder, or a Hub name); it is only read."
    return p


def check_listen_args(parser, args):
    """--listen's source (a sentence file, a session folder, or the newest session) and a safe address."""
    if args.listen == "":
        sessions = glob.glob(os.path.join(SESSIONS_DIR, "*", listening.SESSION_FILE))
        if not sessions:
            parser.error(f"--listen: no session under {SESSIONS_DIR} to continue (give a sentence file)")
        args.listen = os.path.dirname(max(sessions, key=os.path.getmtime))
    elif not os.path.exists(args.listen):
        parser.error(f"--listen: no sentence file or session folder at {args.listen}")
    if os.path.isdir(args.listen):
        args.output_dir = args.listen
    check_host_args(parser, args)


def check_host_args(parser, args):
    """A page is served on this machine unless --allow_remote says otherwise."""
    if args.host not in listening.LOCAL_HOSTS and not args.allow_remote:
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


def new_run_dir(parent, stamp_format="%Y%m%d-%H%M%S"):
    base = os.path.join(parent, time.strftime(stamp_format))
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def newest_run_dir(parent):
    """The latest run with a checkpoint, by the start time new_run_dir put in its name (file dates change
    when folders are copied)."""
    def started(run):
        match = re.fullmatch(r"(\d{8}-\d{6})(?:-(\d+))?", os.path.basename(run))
        return (match.group(1), int(match.group(2) or 1)) if match else ("", 0)
    runs = [d for d in glob.glob(os.path.join(parent, "*"))
            if glob.glob(os.path.join(d, "checkpoints", "checkpoint_epoch_*.pt"))]
    return max(runs, key=started) if runs else None


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.target_minutes is not None and args.target_hours is not None:
        parser.error("give --target_minutes or --target_hours, not both")
    if args.target_minutes is not None:
        if not (math.isfinite(args.target_minutes) and args.target_minutes > 0):
            parser.error(f"--target_minutes must be positive, got {args.target_minutes}")
        args.target_hours = args.target_minutes / 60
    elif args.target_hours is None:
        args.target_hours = 0.5
    if not 0 <= args.replay_ratio < 1:
        parser.error(f"--replay_ratio must be at least 0 and below 1 (1 would leave no room for feedback), "
                     f"got {args.replay_ratio}")
    if not (math.isfinite(args.feedback_weight) and args.feedback_weight > 0):
        parser.error(f"--feedback_weight must be positive, got {args.feedback_weight}")
    if args.make_session and not os.path.isfile(args.make_session):
        parser.error(f"--make_session: no sentence file at {args.make_session}")
    if args.listen is not None:
        if args.make_session:
            parser.error("give --make_session or --listen, not both (--listen makes the kit itself)")
        check_listen_args(parser, args)
    if args.compare is not None:
        if args.listen is not None or args.make_session:
            parser.error("--compare serves a page of its own: give it without --listen or --make_session")
        if not os.path.isdir(args.compare):
            parser.error(f"--compare: no run folder at {args.compare}")
        args.output_dir = args.compare
        check_host_args(parser, args)
    if args.output_dir is None:
        if args.make_session or args.listen:
            args.output_dir = new_run_dir(SESSIONS_DIR, "%Y-%m-%d")
        elif args.resume == "auto":
            args.output_dir = newest_run_dir(FEEDBACK_MODELS_DIR)
            if args.output_dir is None:
                parser.error(f"--resume auto: no feedback run with a checkpoint under {FEEDBACK_MODELS_DIR} "
                             "(pass --output_dir)")
        elif args.resume:
            # .../<run>/checkpoints/checkpoint_epoch_N.pt continues in <run>
            args.output_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
        else:
            args.output_dir = new_run_dir(FEEDBACK_MODELS_DIR)
    # The model that already works must never be overwritten: fit() writes final_model/, checkpoints/,
    # samples/ and a cache under output_dir, so the two folders may not overlap either way.
    if args.compare is None and os.path.isdir(args.model) and run_folder.overlap(args.output_dir, args.model):
        parser.error(f"--output_dir {args.output_dir} overlaps --model {args.model}: the input model is never "
                     "written to; choose a new folder (the default is a new one under training/feedback_models)")
    training_flags.check_args(parser, args)
    return args


# ----------------------------------------------------------------------------------------------------
# Feedback clips: text cleaned as prepare_data.py does, audio preloaded as train_vits.py does.

def load_feedback(feedback_dir, tokenizer, vocab, sampling_rate, cache_dir, num_workers):
    """Feedback clips as a ClipSet, the cleaned sentences of all rows with speakable text, and the skipped clips.

    Returns (clipset, sentences [(file, text)], skipped [{"file", "reason", "detail"}], rows listed).
    """
    if not os.path.isdir(feedback_dir):
        raise run_errors.TrainingError(f"--feedback_dir {feedback_dir}: no such folder")
    metadata = os.path.join(feedback_dir, "metadata.csv")
    if os.path.isfile(metadata):  # it wins over NAME.txt files: it was written on purpose
        try:
            rows, malformed = speech.parse_metadata(metadata)
        except speech.MetadataError as err:
            raise run_errors.TrainingError(str(err)) from None
        skipped = [dict(file=None, reason="malformed_row", detail="not a filename|text line") for _ in range(malformed)]
    else:
        rows, skipped = read_pairs(feedback_dir)
    listed = len(rows) + len(skipped)
    if not rows:
        raise run_errors.TrainingError(f"--feedback_dir {feedback_dir}: no recordings listed (NAME.wav + NAME.txt "
                                       "pairs, or a metadata.csv of filename|text rows; --make_session writes a kit)")
    texts, sentences = {}, []
    for name, raw in rows:
        if name in texts or any(s["file"] == name for s in skipped):
            skipped.append(dict(file=name, reason="duplicate", detail="a second row for the same file"))
            continue
        if speech.outside_folder(name):
            skipped.append(dict(file=name, reason="bad_path", detail="the path leaves --feedback_dir"))
            continue
        text, reason = speech.clean_text(raw, vocab)
        if reason:
            skipped.append(dict(file=name, reason=reason, detail=raw))
            continue
        texts[name] = text
        sentences.append((name, text))

    # Only clips with speakable text are decoded.
    clips, errors = (clip_data.load_clips(feedback_dir, sampling_rate, cache_dir, num_workers, audio_subdir="",
                                          entries=sentences) if sentences else ([], []))
    for err in errors:
        name = err.split(": ", 1)[0]
        if name in texts:
            skipped.append(dict(file=name, reason=audio_reason(os.path.join(feedback_dir, name), sampling_rate),
                                detail=err.split(": ", 1)[-1]))
    decoded_ok = {name for name, *_ in clips}
    for name in texts:
        if name not in decoded_ok and not any(s["file"] == name for s in skipped):
            # load_clips names unreadable clips by base name; a row pointing into a subfolder lands here.
            skipped.append(dict(file=name, reason=audio_reason(os.path.join(feedback_dir, name), sampling_rate),
                                detail="unreadable"))
    usable = []
    for name, _, pcm, _ in clips:
        if name not in texts:
            continue
        # Trimmed as prepare_data.py trims the training clips: a phone recording's silent edges would
        # otherwise teach the voice to pause before and after every sentence.
        audio = speech.trim_silence(pcm.astype(np.float32) / 32768.0)
        if speech.is_silent(audio):
            skipped.append(dict(file=name, reason="silent", detail="nothing louder than -50 dBFS"))
            continue
        if len(audio) < spectrogram.HOP:
            skipped.append(dict(file=name, reason="too_short", detail=f"{len(audio)} samples after trimming"))
            continue
        pcm = speech.to_int16(audio)  # exact: audio came from int16 / 32768
        mel = spectrogram.mel_spectrogram(torch.from_numpy(pcm.astype(np.float32) / 32768.0)[None], sampling_rate)[0]
        usable.append((name, texts[name], pcm, mel.numpy().astype(np.float16)))
    clipset = clip_data.ClipSet(usable, tokenizer)
    kept = set(clipset.names)
    for name, text, pcm, mel in usable:
        if name not in kept:
            n_ids = len(speech.token_ids(tokenizer, text))
            reason = "too_few_frames" if n_ids > mel.shape[1] else "empty_text"
            skipped.append(dict(file=name, reason=reason, detail=f"{n_ids} token ids, "
                                                                 f"{mel.shape[1]} frames"))
    return clipset, sentences, skipped, listed


def read_pairs(feedback_dir):
    """A recording app's folder: NAME.<audio> + NAME.txt; return ([(audio file, text)], skipped).

    Audio without its text, or with an empty one, is skipped by name. A text without audio (a sentence not
    recorded yet, the session kit's README.txt) is no clip. Subfolders (the kit's model/) are not read.
    """
    rows, skipped = [], []
    for name in sorted(os.listdir(feedback_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in AUDIO_EXTENSIONS or not os.path.isfile(os.path.join(feedback_dir, name)):
            continue
        text_file = os.path.join(feedback_dir, stem + ".txt")
        try:
            with open(text_file, encoding="utf-8-sig") as f:
                text = " ".join(f.read().split())
        except FileNotFoundError:
            skipped.append(dict(file=name, reason="no_text", detail=f"no {stem}.txt beside it"))
            continue
        except (OSError, UnicodeDecodeError) as err:
            skipped.append(dict(file=name, reason="unreadable_text", detail=f"{stem}.txt: {err}"))
            continue
        if not text:
            skipped.append(dict(file=name, reason="empty_text", detail=f"{stem}.txt is empty"))
            continue
        rows.append((name, text))
    return rows, skipped


def audio_reason(path, sampling_rate):
    """Why a clip the preload could not read is unusable, under prepare_data.py's reason names."""
    try:
        audio = speech.load_audio(path, sampling_rate)
    except speech.AudioError as err:
        return err.reason
    except Exception:  # noqa: BLE001 - anything else is reported, never raised
        return "decode_error"
    return "too_short" if len(audio) < spectrogram.HOP else "decode_error"


def count_reasons(skipped):
    counts = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return dict(sorted(counts.items()))


def load_original(args, sampling_rate, tokenizer, model, speaker_table):
    """(train, held-out) ClipSets of the original training set, or (None, None) when there is none; for a
    multi-speaker voice each clip with its speaker's id, the clips of other speakers left out."""
    metadata = os.path.join(args.data_dir, "metadata.csv")
    if not os.path.isfile(metadata):
        return None, None, []
    # Reuse train_vits.py's preload cache when it holds exactly these clips (read only: a cache that
    # does not match is never replaced there); otherwise decode into this run's own cache.
    entries = speech.read_metadata(metadata)[:args.max_samples] if args.max_samples else speech.read_metadata(metadata)
    cache_dir = os.path.join(args.output_dir, "cache", "original")
    for candidate in (os.path.join(args.data_dir, "cache"), os.path.join(os.path.dirname(args.model), "cache")):
        if os.path.isfile(clip_data.cache_path(candidate, os.path.join(args.data_dir, "wavs"), entries, sampling_rate)):
            cache_dir = candidate
            break
    clips, errors = clip_data.load_clips(args.data_dir, sampling_rate, cache_dir, args.num_workers, args.max_samples)
    clipset = speakers.label_replay(clip_data.ClipSet(clips, tokenizer), args.data_dir, model, speaker_table)
    # The same split as train_vits.py with the same --val_size: these clips were never trained on.
    train, val = clip_data.split_validation(clipset, args.val_size)
    return train, val, errors


# ----------------------------------------------------------------------------------------------------
# Replay: every micro-batch mixes feedback and original clips.

def mixed_batches(feedback, original, batch_size, replay_ratio, feedback_weight, seed):
    """make_batches for fit(): each micro-batch holds feedback clips and replayed original clips.

    An epoch uses every feedback clip `feedback_weight` times (the fraction as a seeded random subset) and
    fills round(batch_size * replay_ratio) places of each batch (carried over between batches when it is
    not whole) with original clips, walking a fixed shuffled order of the original set onwards from epoch
    to epoch, so replay covers as much of it as the run allows. Batches are length-bucketed (feedback
    and original clips of similar lengths together) and shuffled. Deterministic for a given epoch.
    Returns make(epoch) -> [[(clipset, index), ...], ...].
    """
    replay = original is not None and len(original) > 0 and replay_ratio > 0
    fb_lengths = [feedback.frames(i) for i in range(len(feedback))]
    whole, fraction = int(feedback_weight), feedback_weight - int(feedback_weight)
    extra = round(fraction * len(feedback))
    per_epoch_fb = whole * len(feedback) + extra
    # Original places per batch: error diffusion keeps the share exact over the epoch.
    counts, placed, given = [], 0, 0
    while placed < per_epoch_fb:
        n_orig = (int((len(counts) + 1) * batch_size * replay_ratio) - given) if replay else 0
        if batch_size > 1:
            n_orig = min(n_orig, batch_size - 1)  # at least one feedback clip in every batch
        # (with --batch_size 1 the sources alternate between micro-batches instead)
        counts.append(n_orig)
        given += n_orig
        placed += batch_size - n_orig
    per_epoch_orig = given
    if replay:
        orig_order = list(range(len(original)))
        random.Random(seed).shuffle(orig_order)
        orig_lengths = [original.frames(i) for i in range(len(original))]

    def make(epoch):
        rng = random.Random(seed * 1000 + epoch)
        items = [i for _ in range(whole) for i in range(len(feedback))] + rng.sample(range(len(feedback)), extra)
        items.sort(key=lambda i: fb_lengths[i] * (1.0 + 0.1 * rng.random()))
        batches, pos = [], 0
        for n_orig in counts:
            take = batch_size - n_orig
            batches.append([(feedback, i) for i in items[pos:pos + take]])
            pos += take
        if replay:
            start = (epoch - 1) * per_epoch_orig
            picked = [orig_order[(start + k) % len(original)] for k in range(per_epoch_orig)]
            picked.sort(key=lambda i: orig_lengths[i] * (1.0 + 0.1 * rng.random()))
            pos = 0
            for batch, n_orig in zip(batches, counts):
                batch.extend((original, i) for i in picked[pos:pos + n_orig])
                pos += n_orig
        rng.shuffle(batches)
        return batches

    return make


def epoch_views(make_batches):
    """The clip sets fit() and the planner see: one per source, holding exactly the items of one epoch
    (the planner sizes epochs by their length; resume checks their names)."""
    by_set = {}
    for batch in make_batches(1):
        for cs, i in batch:
            by_set.setdefault(id(cs), (cs, []))[1].append(i)
    return [cs.subset(idx) for cs, idx in by_set.values()]


# ----------------------------------------------------------------------------------------------------
# Listening samples and the report.

def speak_all(model, tokenizer, feedback_sentences, eval_sentences, out_dir, speaker_id):
    """feedback/<clip>.wav for each feedback sentence, eval/NN.wav for the fixed ones; the same names
    before and after, so the folders compare side by side."""
    paths = voice_quality.synthesise(model, tokenizer, [text for _, text in feedback_sentences],
                                     os.path.join(out_dir, "feedback"), speaker_id=speaker_id)
    for path, (name, _) in zip(paths, feedback_sentences):
        os.replace(path, os.path.join(out_dir, "feedback", sample_name(name)))
    voice_quality.synthesise(model, tokenizer, eval_sentences, os.path.join(out_dir, "eval"), speaker_id=speaker_id)


def sample_name(clip_name):
    return os.path.splitext(clip_name.replace(os.sep, "_"))[0] + ".wav"


def write_recordings(clipset, sampling_rate, out_dir):
    """The recordings themselves at the model's rate, under the same names as the samples."""
    os.makedirs(out_dir, exist_ok=True)
    for name, pcm in zip(clipset.names, clipset.audio):
        speech.write_wav(os.path.join(out_dir, sample_name(name)), pcm.astype(np.float32) / 32768.0, sampling_rate)


def evaluate_all(trainer, val_sets, args):
    """Validation loss terms and, with --eval_clips, the voice-quality metrics of every set."""
    return {name: dict(trainer.evaluate(cs, args.batch_size),
                       **voice_quality.evaluate_quality(trainer.model, cs, args.eval_clips))
            if cs is not None and len(cs) else None for name, cs in val_sets.items()}


def write_json(path, data):
    run_folder.write_atomically(path, json.dumps(data, indent=2, ensure_ascii=False), durable=False)


def compare(before, after, key="mel"):
    """{set: {"before", "after", "change"}} of one measure (None where a set is empty or lacks it)."""
    out = {}
    for name in before:
        b = before[name].get(key) if before[name] else None
        a = after[name].get(key) if after.get(name) else None
        out[name] = dict(before=b, after=a, change=None if a is None or b is None else a - b)
    return out


def print_comparison(table, title="validation mel loss (lower is better)"):
    print(f"{title}:")
    for name, row in table.items():
        if row["before"] is None:
            print(f"  {name:<18} no clips")
        else:
            print(f"  {name:<18} before {row['before']:.4f}  after {row['after']:.4f}  change {row['change']:+.4f}")


# ----------------------------------------------------------------------------------------------------
# The listening-session kit.

def make_session(args):
    """Speak every sentence of the file with the current voice into model/sNNN.wav and write sNNN.txt:
    recordings saved as sNNN.wav beside them make the folder a feedback folder as it is."""
    with open(args.make_session, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    model, tokenizer = models.load_voice(args.model)
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
    os.makedirs(model_dir, exist_ok=True)
    for path, (wav, _) in zip(voice_quality.synthesise(model, tokenizer, spoken, model_dir, speaker_id=speaker), rows):
        os.replace(path, os.path.join(model_dir, wav))
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
            f"3. python train_feedback.py --model {args.model} --feedback_dir {out}"
            + (f" --speaker_id {speaker}" if speaker is not None else "") + "\n")
    for line, reason in unspeakable:
        print(f"left out ({reason}): {line}")
    print(f"session kit: {len(rows)} sentences in {out} (listen to {model_dir}, record into {out}, "
          "see README.txt)")
    return out


def listen(args):
    """--listen: a new kit from a sentence file (as --make_session makes it), then the page on the session."""
    if os.path.isfile(args.listen):
        args.make_session = args.listen
        args.listen = make_session(args)
    listening.serve(args.listen, args)


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    budget = planning.Budget(args.target_hours * 3600)
    lock = None
    try:
        if args.listen is not None:
            listen(args)
            return 0
        if args.compare is not None:
            blind_compare.serve(args.compare, args, SESSIONS_DIR)
            return 0
        lock = run_folder.claim_output_dir(args, "train_feedback")
        if args.make_session:
            make_session(args)
            return 0
        # 1. Machine and precision; under torchrun every rank takes the new folder rank 0 named.
        device, precision = vits_trainer.set_up_machine(args)
        args = argparse.Namespace(**dict(vars(args), output_dir=distributed.broadcast_object(args.output_dir)))
        os.makedirs(args.output_dir, exist_ok=True)

        # 2. The trained voice and its critic (read only: the tuned copy goes to output_dir).
        resume = checkpoints.resume_state(args)
        model, tokenizer = models.load_voice(args.model)
        _, vocab = speech.load_vocab(args.model)
        models.prepare_for_training(model)
        disc, disc_path = models.critic_for_run(args, resume)
        sr = model.config.sampling_rate
        speaker_table = speakers.read_table(args.model)
        speaker = speakers.feedback_speaker(model.config, speaker_table, args.speaker_id)
        if speaker is not None:
            print(f"speaker: the feedback trains speaker {speaker} of {model.config.num_speakers}")

        # 3. Feedback clips, and the original training set to replay.
        fb_all, fb_sentences, skipped, listed = load_feedback(args.feedback_dir, tokenizer, vocab, sr,
                                                              os.path.join(args.output_dir, "cache", "feedback"),
                                                              args.num_workers)
        for s in skipped:
            print(f"skipped feedback clip {s['file']}: {s['reason']} ({s['detail']})")
        if len(fb_all) == 0:
            raise run_errors.TrainingError(f"--feedback_dir {args.feedback_dir}: no usable feedback clip "
                                           f"(skipped: {count_reasons(skipped)})")
        fb_all = fb_all.with_speaker(speaker)
        fb_train, fb_val = clip_data.split_validation(fb_all, args.val_size, at_least_one=True)
        orig_train, orig_val, orig_errors = load_original(args, sr, tokenizer, model, speaker_table)
        if orig_train is None or len(orig_train) == 0:
            print(f"no original training data in {args.data_dir} (no metadata.csv or no usable clip): training "
                  "on feedback alone, nothing is replayed and the voice may drift on other sentences")
        elif args.replay_ratio == 0:
            print("--replay_ratio 0: training on feedback alone; the original clips are only used to validate")
        print(f"feedback: {len(fb_train)} clips to train on, {len(fb_val)} held out, {len(skipped)} skipped "
              f"{count_reasons(skipped)}; original: {len(orig_train or []) if args.replay_ratio else 0} to replay, "
              f"{len(orig_val or [])} held out")

        # 4. Trainer and batches; the feedback set first, so fit() keeps the best model by it.
        trainer = vits_trainer.VitsTrainer(model, disc, args, device, precision,
                                           vits_trainer.critic_learning_rate(args, fresh=disc_path is None))
        if args.batch_size == "auto":
            # Tried on the longest clips the batches can hold: replayed originals may be longer than feedback.
            longest = max([fb_train] + ([orig_train] if orig_train and args.replay_ratio else []),
                          key=lambda cs: max(map(cs.frames, range(len(cs)))))
            args = planning.with_batch(args, *planning.choose_batch_size(trainer, longest, args, resume[1]))
        make_batches = mixed_batches(fb_train, orig_train, args.batch_size, args.replay_ratio,
                                     args.feedback_weight, args.seed)
        rank_batches = distributed.shard_batches(make_batches)  # this process's share under torchrun
        train_sets = epoch_views(make_batches)
        first_epoch = [cs for batch in make_batches(1) for cs, _ in batch]
        items_per_epoch = dict(feedback=sum(cs is fb_train for cs in first_epoch),
                               original=sum(cs is not fb_train for cs in first_epoch))
        val_sets = {"feedback": fb_val, "original": orig_val}
        fit_val_sets = {k: v for k, v in val_sets.items() if v is not None and len(v)}
        report_sets = dict(val_sets, feedback_trained=fb_train)
        eval_sentences = voice_quality.read_sentences(args.sample_sentences)
        save_run_info(args, disc_path, precision, device, fb_train, fb_val, orig_train, orig_val, skipped)

        # 5. Before: listening samples and validation of the input voice (kept when resuming).
        report_path = os.path.join(args.output_dir, REPORT_NAME)
        report = read_report(report_path) if args.resume else None
        if report is None and distributed.is_main_process():
            start = time.time()
            before = evaluate_all(trainer, report_sets, args)
            speak_all(trainer.model, tokenizer, fb_sentences, eval_sentences,
                      os.path.join(args.output_dir, "samples", "before"), speaker)
            write_recordings(fb_all, sr, os.path.join(args.output_dir, "samples", "recorded"))
            report = dict(status="training", model=args.model, discriminator=disc_path, before=before,
                          before_seconds=time.time() - start)
            write_json(report_path, report)
        report = distributed.broadcast_object(report)  # the other ranks wait for it
        # The same work is done again after training: keep time for it.
        budget.keep_back(1.5 * report["before_seconds"] + 5)

        # 6. Plan (or resume), then train with the loop train_vits.py trains with.
        run, data_key = loop.start_run(trainer, train_sets, rank_batches, fit_val_sets, args, budget,
                                       default_d_warmup=0 if disc_path else 50, resume=resume,
                                       fixed_flags=RESUME_FIXED)
        del resume  # its tensors are the trainer's now
        reason = loop.fit(trainer, tokenizer, train_sets, rank_batches, fit_val_sets, args, budget, run, data_key,
                          speaker_table)
        if reason == "interrupted":
            return 130
        if not distributed.is_main_process():
            return 0

        # 7. After: the same samples and validation with the tuned voice, and the report.
        after = evaluate_all(trainer, report_sets, args)
        speak_all(trainer.model, tokenizer, fb_sentences, eval_sentences,
                  os.path.join(args.output_dir, "samples", "after"), speaker)
        table = compare(report["before"], after)
        quality = {key: compare(report["before"], after, key) for key in QUALITY_KEYS} if args.eval_clips else {}
        report.update(
            status="done", stop_reason=reason, final_model=os.path.join(args.output_dir, "final_model"),
            speaker_id=speaker,
            validation_mel=table, quality=quality, after=after, steps=trainer.step, skipped_steps=trainer.skipped_steps,
            minutes=round(budget.used() / 60, 2),
            feedback=dict(dir=args.feedback_dir, listed=listed, trained=len(fb_train), held_out=len(fb_val),
                          held_out_clips=fb_val.names, skipped=count_reasons(skipped), skipped_clips=skipped),
            original=dict(dir=args.data_dir, replayed_from=len(orig_train or []), held_out=len(orig_val or []),
                          unreadable=len(orig_errors), replay_ratio=args.replay_ratio if orig_train else 0.0),
            feedback_weight=args.feedback_weight, items_per_epoch=items_per_epoch,
            samples=dict(before=os.path.join(args.output_dir, "samples", "before"),
                         after=os.path.join(args.output_dir, "samples", "after"),
                         recorded=os.path.join(args.output_dir, "samples", "recorded"),
                         feedback={sample_name(n): t for n, t in fb_sentences},
                         eval={f"{i:02d}.wav": t for i, t in enumerate(eval_sentences)}))
        write_json(report_path, report)
        run_report.update(args.output_dir)
        print_comparison(table)
        for key, title in QUALITY_KEYS.items():
            if key in quality:
                print_comparison(quality[key], title)
        print(f"tuned voice: {report['final_model']} ({reason}, {trainer.step} steps, {report['minutes']:.1f} min); "
              f"listen to {report['samples']['before']} vs {report['samples']['after']}; report: {report_path}")
    except (run_errors.TrainingError, OSError, KeyboardInterrupt) as err:
        return run_errors.report_fatal(err, args.output_dir)
    finally:
        if lock:
            lock.release()
        distributed.leave_distributed()
    return 0


def read_report(path):
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    return report if "before" in report else None


def save_run_info(args, disc_path, precision, device, fb_train, fb_val, orig_train, orig_val, skipped):
    loop.save_run_info(args, dict(script="train_feedback", precision=precision, device=str(device),
                                  discriminator=disc_path,
                                  feedback_train_clips=len(fb_train), feedback_val_clips=len(fb_val),
                                  original_train_clips=len(orig_train or []), original_val_clips=len(orig_val or []),
                                  skipped_feedback=count_reasons(skipped)))


if __name__ == "__main__":
    sys.exit(main())
