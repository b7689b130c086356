"""One feedback run of train_feedback.py: its clips (the recordings, trimmed while they are decoded, and the
original set to replay and hold out), the batches that mix them, the voice's samples and figures before and
after, and report.json."""

import os
import random
import time
from types import SimpleNamespace

import numpy as np
import soundfile as sf

from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.common import speech
from voicetune.night import checkpoints
from voicetune.night import clip_data
from voicetune.night import loop
from voicetune.voice import speak_lines
from voicetune.voice import speakers
from voicetune.voice import speaking
from voicetune.voice import voice_quality

# Files of a feedback folder that are recordings: every format soundfile reads, by extension.
AUDIO_EXTENSIONS = {f".{fmt.lower()}" for fmt in sf.available_formats()} | {".opus", ".oga", ".aif"}
# How print_report titles run_files.QUALITY_MEASURES.
QUALITY_TITLES = {"mcd": "MCD-DTW, dB (lower is better)", "dur_ratio": "duration ratio, spoken / recorded (1 is right)",
                  "dnsmos_ovrl": "DNSMOS OVRL (higher is better)"}
# Flags a resumed feedback run keeps besides train_vits.py's: they decide which clips make up each batch.
RESUME_FIXED = checkpoints.RESUME_FIXED + ("replay_ratio", "feedback_weight", "feedback_only")


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
    sentences, seen = [], {s["file"] for s in skipped}
    for name, raw in rows:
        if name in seen:
            skipped.append(dict(file=name, reason="duplicate", detail="a second row for the same file"))
            continue
        seen.add(name)
        if speech.outside_folder(name):
            skipped.append(dict(file=name, reason="bad_path", detail="the path leaves --feedback_dir"))
            continue
        text, reason = speech.clean_text(raw, vocab)
        if reason:
            skipped.append(dict(file=name, reason=reason, detail=raw))
            continue
        sentences.append((name, text))
    # Only clips with speakable text are decoded; their silent edges are cut as prepare_data.py cuts the
    # training clips' (a phone recording's would teach the voice to pause around every sentence).
    clips = clip_data.load_clips(feedback_dir, sampling_rate, cache_dir, num_workers, audio_subdir="",
                                 entries=sentences, trim=True, skipped=skipped)[0] if sentences else []
    clipset = clip_data.ClipSet(clips, tokenizer)
    return clipset, sentences, skipped + clipset.dropped_clips, listed


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


def count_reasons(skipped):
    counts = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return dict(sorted(counts.items()))


def load_original(args, sampling_rate, tokenizer, model, speaker_table):
    """(train, held-out) ClipSets of the original training set, or (None, None) when there is none; for a
    multi-speaker voice each clip with its speaker's id, the clips of other speakers left out."""
    metadata = os.path.join(args.data_dir, "metadata.csv")
    if args.feedback_only or not os.path.isfile(metadata):
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


def load_sets(args, tokenizer, vocab, model, speaker_table, speaker):
    """Every clip set of the run, said in a few lines: the feedback clips (all, trained on, held out), their
    sentences and the skipped ones, and the original set's replayed and held-out clips."""
    fb_all, sentences, skipped, listed = load_feedback(args.feedback_dir, tokenizer, vocab,
                                                       model.config.sampling_rate,
                                                       os.path.join(args.output_dir, "cache", "feedback"),
                                                       args.num_workers)
    for s in skipped:
        print(f"skipped feedback clip {s['file']}: {s['reason']} ({s['detail']})")
    if len(fb_all) == 0:
        raise run_errors.TrainingError(f"--feedback_dir {args.feedback_dir}: no usable feedback clip "
                                       f"(skipped: {count_reasons(skipped)})")
    fb_all = fb_all.with_speaker(speaker)
    fb_train, fb_val = clip_data.split_validation(fb_all, args.val_size, at_least_one=True)
    orig_train, orig_val, orig_errors = load_original(args, model.config.sampling_rate, tokenizer, model,
                                                      speaker_table)
    if orig_train is None or len(orig_train) == 0:
        print(("--feedback_only: no original training data" if args.feedback_only else
               f"no original training data in {args.data_dir} (no usable clip)")
              + ": training on feedback alone, nothing is replayed and the voice may drift on other sentences")
    elif args.replay_ratio == 0:
        print("--replay_ratio 0: training on feedback alone; the original clips are only used to validate")
    print(f"feedback: {len(fb_train)} clips to train on, {len(fb_val)} held out, {len(skipped)} skipped "
          f"{count_reasons(skipped)}; original: {len(orig_train or []) if args.replay_ratio else 0} to replay, "
          f"{len(orig_val or [])} held out")
    return SimpleNamespace(fb_all=fb_all, sentences=sentences, skipped=skipped, listed=listed, fb_train=fb_train,
                           fb_val=fb_val, orig_train=orig_train, orig_val=orig_val, orig_errors=orig_errors)


def longest_source(sets, replay_ratio):
    """The clip set whose longest clip is longest among those batches draw from (batch size auto tries it)."""
    sources = [sets.fb_train] + ([sets.orig_train] if sets.orig_train and replay_ratio else [])
    return max(sources, key=lambda cs: max(map(cs.frames, range(len(cs)))))


def save_run_info(args, disc_path, precision, device, sets):
    loop.save_run_info(args, dict(script="train_feedback", precision=precision, device=str(device),
                                  discriminator=disc_path,
                                  feedback_train_clips=len(sets.fb_train), feedback_val_clips=len(sets.fb_val),
                                  original_train_clips=len(sets.orig_train or []),
                                  original_val_clips=len(sets.orig_val or []),
                                  skipped_feedback=count_reasons(sets.skipped)))


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


def items_per_epoch(make_batches, feedback):
    """{"feedback", "original"}: how many items of one epoch come from each source."""
    first_epoch = [cs for batch in make_batches(1) for cs, _ in batch]
    return dict(feedback=sum(cs is feedback for cs in first_epoch),
                original=sum(cs is not feedback for cs in first_epoch))


# ----------------------------------------------------------------------------------------------------
# Listening samples, validation before and after, and the report.

def speak_all(model, tokenizer, feedback_sentences, eval_sentences, out_dir, speaker_id):
    """feedback/<clip>.wav for each feedback sentence, eval/NN.wav for the fixed ones; the same names
    before and after, so the folders compare side by side."""
    voice = speaking.TorchVoice(model, tokenizer, speaker_id, speaking.SAMPLE_MAX_SECONDS)
    speak_lines.speak_files(voice, [(run_files.sample_name(name), text) for name, text in feedback_sentences],
                            os.path.join(out_dir, run_files.FEEDBACK_SAMPLES))
    speak_lines.speak_files(voice, [(run_files.sentence_sample(i), text) for i, text in enumerate(eval_sentences)],
                            os.path.join(out_dir, run_files.EVAL_SAMPLES))


def write_recordings(clipset, sampling_rate, out_dir):
    """The recordings themselves at the model's rate, under the same names as the samples."""
    os.makedirs(out_dir, exist_ok=True)
    for name, pcm in zip(clipset.names, clipset.audio):
        speech.write_wav(os.path.join(out_dir, run_files.sample_name(name)), pcm.astype(np.float32) / 32768.0,
                         sampling_rate)


def report_sets(sets):
    """The clip sets measured before and after: held-out feedback, held-out original, feedback trained on."""
    return dict(feedback=sets.fb_val, original=sets.orig_val, feedback_trained=sets.fb_train)


def validation_sets(sets):
    """What fit() validates after every epoch, the held-out feedback clips first (the best model's measure)."""
    return {name: cs for name, cs in (("feedback", sets.fb_val), ("original", sets.orig_val))
            if cs is not None and len(cs)}


def evaluate_all(trainer, val_sets, args):
    """Validation loss terms and, with --eval_clips, the voice-quality metrics of every set; for the held-out
    sets also each clip's own figures (per_clip: mel, mcd, dur_ratio), which the verdict pairs before with
    after (each clip validated alone on its seeded slices, so before and after see the same ones)."""
    figures = {}
    for name, cs in val_sets.items():
        if cs is None or not len(cs):
            figures[name] = None
            continue
        per_clip = voice_quality.quality_per_clip(trainer.model, cs, args.eval_clips)
        figures[name] = dict(trainer.evaluate(cs, args.batch_size), **voice_quality.summarise_quality(per_clip))
        if name in run_files.HELD_OUT:
            figures[name]["per_clip"] = dict(mel=[trainer.evaluate(cs.subset([i]), 1)["mel"] for i in range(len(cs))],
                                             mcd=per_clip["mcd"], dur_ratio=per_clip["dur_ratio"])
    return figures


def measure_before(trainer, tokenizer, sets, eval_sentences, args, speaker, disc_path):
    """The input voice's samples and figures: report.json's first version (kept by a resumed run)."""
    start = time.time()
    before = evaluate_all(trainer, report_sets(sets), args)
    samples = os.path.join(args.output_dir, run_files.SAMPLES)
    speak_all(trainer.model, tokenizer, sets.sentences, eval_sentences, os.path.join(samples, run_files.BEFORE),
              speaker)
    write_recordings(sets.fb_all, trainer.model.config.sampling_rate, os.path.join(samples, run_files.RECORDED))
    report = dict(status="training", model=args.model, model_sha256=run_files.model_fingerprint(args.model),
                  discriminator=disc_path, before=before, before_seconds=time.time() - start)
    run_files.write_report(args.output_dir, report)
    return report


def measure_after(report, trainer, tokenizer, sets, eval_sentences, args, speaker, stop_reason, minutes,
                  items):
    """The tuned voice's samples and figures, compared with the input's in `report` (updated in place)."""
    after = evaluate_all(trainer, report_sets(sets), args)
    out = args.output_dir
    samples = os.path.join(out, run_files.SAMPLES)
    speak_all(trainer.model, tokenizer, sets.sentences, eval_sentences, os.path.join(samples, run_files.AFTER), speaker)
    report.update(
        status="done", stop_reason=stop_reason, final_model=os.path.join(out, run_files.FINAL_MODEL),
        speaker_id=speaker,
        validation_mel=compare(report["before"], after),
        quality={key: compare(report["before"], after, key) for key in run_files.QUALITY_MEASURES}
        if args.eval_clips else {},
        after=after, steps=trainer.step, skipped_steps=trainer.skipped_steps, minutes=minutes,
        precision=trainer.precision, fp32_from_step=trainer.fp32_from_step,
        feedback=dict(dir=args.feedback_dir, listed=sets.listed, trained=len(sets.fb_train),
                      held_out=len(sets.fb_val), held_out_clips=sets.fb_val.names,
                      skipped=count_reasons(sets.skipped), skipped_clips=sets.skipped),
        original=dict(dir=args.data_dir, replayed_from=len(sets.orig_train or []), held_out=len(sets.orig_val or []),
                      unreadable=len(sets.orig_errors), replay_ratio=args.replay_ratio if sets.orig_train else 0.0),
        feedback_weight=args.feedback_weight, items_per_epoch=items,
        samples=dict(before=os.path.join(samples, run_files.BEFORE), after=os.path.join(samples, run_files.AFTER),
                     recorded=os.path.join(samples, run_files.RECORDED),
                     feedback={run_files.sample_name(n): t for n, t in sets.sentences},
                     eval={run_files.sentence_sample(i): t for i, t in enumerate(eval_sentences)}))
    return report


def intelligibility(sets, eval_sentences, args):
    """--asr_model's character error rate of the sentences never trained on (the held-out feedback clips'
    and the evaluation sentences), as the voice spoke them before and after: in all and per sentence."""
    samples = os.path.join(args.output_dir, run_files.SAMPLES)
    names = [os.path.join(run_files.FEEDBACK_SAMPLES, run_files.sample_name(n)) for n in sets.fb_val.names] + [
        os.path.join(run_files.EVAL_SAMPLES, run_files.sentence_sample(i)) for i in range(len(eval_sentences))]
    texts = list(sets.fb_val.texts) + list(eval_sentences)
    heard = {when: voice_quality.transcribe([os.path.join(samples, when, n) for n in names], args.asr_model,
                                            args.asr_lang) for when in (run_files.BEFORE, run_files.AFTER)}
    return dict(asr_model=args.asr_model, asr_lang=args.asr_lang, sentences=len(texts),
                before=voice_quality.character_error_rate(texts, heard["before"]),
                after=voice_quality.character_error_rate(texts, heard["after"]),
                per_sentence=[dict(text=t, heard_before=b, heard_after=a,
                                   before=voice_quality.character_error_rate([t], [b]),
                                   after=voice_quality.character_error_rate([t], [a]))
                              for t, b, a in zip(texts, heard["before"], heard["after"])])


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


def print_report(report, report_path):
    print_comparison(report["validation_mel"])
    for key, title in QUALITY_TITLES.items():
        if key in report["quality"]:
            print_comparison(report["quality"][key], title)
    print(f"tuned voice: {report['final_model']} ({report['stop_reason']}, {report['steps']} steps, "
          f"{report['minutes']:.1f} min); listen to {report['samples']['before']} vs {report['samples']['after']}; "
          f"report: {report_path}")
