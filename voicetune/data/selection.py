"""Which clips of the list prepare_data.py keeps, and the count of those it leaves out, by reason.

Before any audio is decoded: the vote limits, the speakers (--speaker/--top_speakers), the text rules
(speech.clean_text: what the voice cannot say, digits read as words or --drop_digits, other scripts) and
--max_clips. After decoding: the durations and the frames and speaking rate the text needs. A clip left out
by a choice counts under `not_selected`, one that cannot be trained on under `dropped`.
"""

import sys
from collections import Counter
from typing import NamedTuple

from voicetune.common import run_errors
from voicetune.common import speech
from voicetune.data import sources


class Limits(NamedTuple):
    min_samples: int
    max_samples: int
    min_cps: float
    max_cps: float


class Counts(NamedTuple):
    """Clips left out, each a Counter by reason: dropped (cannot be trained on), not_selected (left out by a
    choice: votes, speakers, --max_clips) and the texts repaired rather than dropped."""
    dropped: Counter
    not_selected: Counter
    repairs: Counter


def limits(args):
    """The audio limits of the duration and speaking-rate flags, durations in samples at speech.SAMPLE_RATE."""
    return Limits(round(args.min_duration * speech.SAMPLE_RATE), round(args.max_duration * speech.SAMPLE_RATE),
                  args.min_chars_per_second, args.max_chars_per_second)


def check_columns(args, header):
    """Refuse a speaker or vote choice the input has no column for, rather than choose nothing."""
    if (args.speaker or args.top_speakers) and "client_id" not in header:
        raise run_errors.TrainingError("--speaker/--top_speakers need a Common Voice input with a client_id column")
    for flag, column in (("min_upvotes", "up_votes"), ("max_downvotes", "down_votes")):
        if getattr(args, flag) is not None and column not in header:
            raise run_errors.TrainingError(f"--{flag} needs a Common Voice input with a {column} column "
                                           f"(found: {', '.join(header)})")


def select_speakers(clips, speakers, top_speakers):
    """Keep the clips of the requested speakers; return (selected, number left out)."""
    if speakers:
        wanted = set(speakers)
        unknown = wanted - {clip.speaker for clip in clips}
        if unknown == wanted:
            raise run_errors.TrainingError(f"none of the --speaker ids is in the input (first: {sorted(unknown)[0]})")
        for speaker in sorted(unknown):
            print(f"warning: --speaker {speaker} has no clips in the input", file=sys.stderr)
    elif top_speakers:
        counts = Counter(clip.speaker for clip in clips)
        wanted = {s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_speakers]}
    else:
        return clips, 0
    selected = [clip for clip in clips if clip.speaker in wanted]
    return selected, len(clips) - len(selected)


def vote_count(row, column):
    """The row's vote count (an empty or blank field counts 0), or None when it is not a number."""
    try:
        return int(float((row.get(column) or "").strip() or 0))
    except ValueError:
        return None


def select_by_votes(rows, min_upvotes, max_downvotes):
    """Rows with at least `min_upvotes` and at most `max_downvotes` votes (None: no limit); return (rows, left out)."""
    selected, left_out = [], Counter()
    for row in rows:
        up, down = vote_count(row, "up_votes"), vote_count(row, "down_votes")
        if min_upvotes is not None and (up is None or up < min_upvotes):
            left_out["too_few_upvotes"] += 1
        elif max_downvotes is not None and (down is None or down > max_downvotes):
            left_out["too_many_downvotes"] += 1
        else:
            selected.append(row)
    return selected, left_out


def choose_clips(args, rows, malformed, vocab):
    """Clean every text and apply the vote, speaker and --max_clips choices.

    Returns (clips, Counts); the clips keep list order, each with its cleaned text.
    """
    dropped, repairs = Counter(), Counter()
    if malformed:
        dropped["malformed_row"] = malformed
    rows, not_selected = select_by_votes(rows, args.min_upvotes, args.max_downvotes)
    clips = []
    for row in rows:
        if not row["path"].strip():
            dropped["malformed_row"] += 1
        elif speech.outside_folder(row["path"]):
            dropped["bad_path"] += 1  # never read from elsewhere on the disk
        else:
            clips.append(sources.Clip(row["path"], row.get("name") or sources.output_name(row["path"]),
                                      row["sentence"], row.get("client_id", "")))
    clips, other_speakers = select_speakers(clips, args.speaker, args.top_speakers)
    if other_speakers:
        not_selected["other_speakers"] = other_speakers
    candidates, seen = [], set()
    for clip in clips:
        # The first row of a clip wins, whatever its text (as in train_vits.py and train_feedback.py).
        text, reason = ((None, "duplicate") if clip.name in seen
                        else speech.clean_text(clip.text, vocab, repairs, numbers=not args.drop_digits))
        seen.add(clip.name)
        if reason:
            dropped[reason] += 1
            continue
        candidates.append(clip._replace(text=text))
    if args.max_clips is not None and len(candidates) > args.max_clips:
        not_selected["max_clips"] = len(candidates) - args.max_clips
        candidates = candidates[:args.max_clips]
    return candidates, Counts(dropped, not_selected, repairs)


def audio_verdict(samples, n_tokens, n_chars, limits):
    """Why a clip of `samples` trimmed samples cannot be trained on with this text, or None."""
    if samples < limits.min_samples:
        return "too_short"
    if samples > limits.max_samples:
        return "too_long"
    # Monotonic alignment needs a frame per token id; fewer frames means the text is not this audio.
    if samples // speech.HOP_LENGTH < n_tokens:
        return "too_few_frames"
    rate = n_chars / (samples / speech.SAMPLE_RATE)
    if not limits.min_cps <= rate <= limits.max_cps:
        return "implausible_rate"
    return None


def tally(candidates, outcomes, dropped):
    """The kept clips as (clip, samples), in list order, and the dropped ones as the report lists them; each
    clip dropped after decoding is counted in `dropped` under its reason."""
    kept, dropped_list = [], []
    for clip in candidates:
        samples, reason, detail = outcomes[clip.name]
        if reason is None:
            kept.append((clip, samples))
        else:
            dropped[reason] += 1
            dropped_list.append({"clip": clip.source, "reason": reason, "detail": detail})
    return kept, dropped_list
