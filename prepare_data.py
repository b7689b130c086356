"""Turn a Common Voice Kurmanji release into a clean VITS training set (16 kHz mono WAVs + metadata.csv).

Reads a Common Voice language folder (`clips/` + `validated.tsv`), the release tarball itself (streamed,
never unpacked to disk), a Hugging Face dataset (a Hub id, parquet shards or a save_to_disk folder, read
with pyarrow in batches) or an LJSpeech-style folder (`wavs/` + `metadata.csv`). Every clip is decoded
with soundfile, mixed to mono, resampled to 16 kHz with librosa and trimmed of leading/trailing silence;
its text is normalised so the tokenizer accepts every character. Clips that are unreadable, silent, too
short or long, hold text the voice cannot say, or whose text cannot match their audio are skipped and
counted by reason. Re-running only decodes what is new.

    # the full release, straight from the tarball, with the real tokenizer
    python prepare_data.py --input cv-corpus-22.0-2025-06-20-kmr.tar.gz --output_dir training

    # an unpacked language folder, one consistent voice, offline tokenizer from a local model folder
    python prepare_data.py --input cv-corpus-22.0-2025-06-20/kmr --top_speakers 1 --model my_model/

    # a Common Voice mirror on the Hugging Face Hub, only clips with 2+ up-votes and no down-vote
    python prepare_data.py --input amedcj/kurmanji-commonvoice --min_upvotes 2 --max_downvotes 0

    # tiny CPU run on the committed sample (see README)
    python prepare_data.py --input examples/cv-kmr-sample --model example_run/tiny_model \\
        --output_dir example_run/data

Output: DIR/wavs/<clip>.wav, DIR/metadata.csv (`<clip>.wav|text`, no header, no quoting),
DIR/speakers.csv (`<clip>.wav|client_id`, for train_vits.py --speakers; none for an input without speakers),
DIR/prepare_report.json (kept clips and hours, dropped clips by reason, hours per speaker) and
DIR/prepare_cache.json (what each clip's audio measured, so a re-run decodes nothing it already knows).
"""

import argparse
import csv
import glob
import io
import json
import os
import posixpath
import re
import signal
import sys
import tarfile
import time
import zlib
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import NamedTuple

import librosa
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from voicetune.common import run_folder
from voicetune.common import speech

DEFAULT_MODEL = "facebook/mms-tts-kmr-script_latin"
# Bump when decoding or trimming changes, so caches made by older code are not trusted.
AUDIO_VERSION = 1
REPORT_NAME = "prepare_report.json"
CACHE_NAME = "prepare_cache.json"
CACHE_EVERY = 2000  # clips between cache saves, so a killed run loses little work
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# Hugging Face datasets: column names Common Voice exports and their mirrors use, in order of preference.
AUDIO_COLUMNS = ("audio", "path")  # a struct of the clip's bytes and file name
TEXT_COLUMNS = ("sentence", "text", "normalized_text", "transcription")
ROW_COLUMNS = ("client_id", "up_votes", "down_votes", "gender")
DATASET_SUFFIXES = (".parquet", ".arrow")
DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")  # save_to_disk / datasets cache
DATASET_BATCH_ROWS = 64  # rows read at a time: the compressed audio of a whole dataset never sits in RAM
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Limits(NamedTuple):
    min_samples: int
    max_samples: int
    min_cps: float
    max_cps: float


# --------------------------------------------------------------------------- input


def read_tsv(path_or_file):
    """Read a Common Voice TSV with quoting off; return (header, rows as dicts by column name, malformed rows)."""
    handle = open(path_or_file, encoding="utf-8-sig", newline="") if isinstance(path_or_file, str) else path_or_file
    with handle:
        # Sentences hold unbalanced '"': with quoting on, csv would swallow the rows after one.
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) or []
        rows, malformed = [], 0
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                malformed += 1
                continue
            rows.append(dict(zip(header, fields)))
    return header, rows, malformed


class Clip(NamedTuple):
    source: str  # path relative to the clips folder (or tar member name)
    name: str  # output wav file name
    text: str
    speaker: str


class Source(NamedTuple):
    kind: str  # "folder", "tar", "ljspeech" or "hf_dataset"
    path: str
    clips_dir: str  # folder of the audio, the tar member prefix, or the dataset folder
    signature: list  # tarball size and mtime, the cache key for every member in it
    audio_column: str = ""  # Hugging Face datasets: the column holding each clip's audio


def fail(message):
    raise SystemExit(f"prepare_data.py: error: {message}")


def find_language_folder(path, tsv):
    """The folder holding `tsv`: `path` itself, or the one release/language folder below it."""
    if os.path.isfile(os.path.join(path, tsv)):
        return path
    for pattern in ("*", os.path.join("*", "*")):
        found = sorted(glob.glob(os.path.join(path, pattern, tsv)))
        if len(found) == 1:
            return os.path.dirname(found[0])
    return None


def open_input(path, tsv):
    """Identify the input and read its clip list; return (Source, header, rows, malformed)."""
    if not os.path.exists(path):
        fail(f"--input {path} does not exist")
    if os.path.isfile(path):
        if not (path.endswith(TAR_SUFFIXES) or tarfile.is_tarfile(path)):
            fail(f"--input {path} is a file but not a .tar/.tar.gz Common Voice release")
        return read_tar_tsv(path, tsv)
    language_dir = find_language_folder(path, tsv)
    if language_dir:
        header, rows, malformed = read_tsv(os.path.join(language_dir, tsv))
        return Source("folder", language_dir, os.path.join(language_dir, "clips"), []), header, rows, malformed
    if os.path.isfile(os.path.join(path, "metadata.csv")) and os.path.isdir(os.path.join(path, "wavs")):
        pairs, malformed = speech.parse_metadata(os.path.join(path, "metadata.csv"))
        # A folder this script wrote keeps its speakers in speakers.csv beside metadata.csv.
        labels = speech.read_speaker_labels(os.path.join(path, speech.SPEAKERS_FILE)) or {}
        rows = [{"path": name, "sentence": text, "client_id": labels.get(name, "")} for name, text in pairs]
        return Source("ljspeech", path, os.path.join(path, "wavs"), []), ["path", "sentence"], rows, malformed
    fail(f"--input {path} holds neither {tsv} (Common Voice) nor wavs/ + metadata.csv (LJSpeech)")


def read_tar_tsv(path, tsv):
    """Stream the tarball until `tsv` turns up; its folder's clips/ is where the audio lives."""
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isfile() and os.path.basename(member.name) == tsv:
                    text = tar.extractfile(member).read().decode("utf-8-sig")
                    header, rows, malformed = read_tsv(io.StringIO(text, newline=""))
                    # Member names use "/" on every system, Windows included.
                    prefix = posixpath.join(posixpath.dirname(member.name), "clips", "")
                    stat = os.stat(path)
                    return Source("tar", path, prefix, [stat.st_size, stat.st_mtime_ns]), header, rows, malformed
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        fail(f"cannot read tarball {path}: {err}")
    fail(f"tarball {path} holds no {tsv}")


def output_name(source_path):
    stem = os.path.splitext(os.path.basename(source_path))[0]
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem) + ".wav"


# --------------------------------------------------------------------------- Hugging Face datasets


def is_hf_dataset(path):
    """A Hub dataset id, a parquet/Arrow file, or a folder of them (Hub snapshot, save_to_disk, datasets cache)."""
    if not os.path.exists(path):
        return bool(HUB_ID.match(path))
    if os.path.isfile(path):
        return path.endswith(DATASET_SUFFIXES)
    if any(os.path.isfile(os.path.join(path, name)) for name in DATASET_MARKERS):
        return True
    # Hub layouts: train-*.parquet, data/train-*.parquet, default/train/0000.parquet.
    return any(glob.glob(os.path.join(path, *["*"] * depth, "*.parquet")) for depth in range(3))


def download_dataset(repo_id, split):
    """Download the split's parquet files of a Hub dataset once into the Hugging Face cache; return the folder."""
    from huggingface_hub import snapshot_download  # comes with transformers; only this input needs it

    patterns = [f"*{split}*.parquet"]  # fnmatch's * crosses "/": data/train-*.parquet, default/train/*.parquet
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns)
        if not dataset_files(folder, split, quiet=True):
            # Datasets published as audio files + a loading script have a parquet copy made by the Hub.
            folder = snapshot_download(repo_id, repo_type="dataset", revision="refs/convert/parquet",
                                       allow_patterns=patterns)
    except Exception as err:  # offline, unknown repo, gated: huggingface_hub raises many kinds
        fail(f"--input {repo_id} is no local path, and as a Hugging Face Hub dataset: {type(err).__name__}: {err}")
    return folder


def dataset_files(path, split, quiet=False):
    """The parquet or Arrow files holding `split` of the dataset at `path` (a folder or one file), in order."""
    if os.path.isfile(path):
        return [path]
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):  # DatasetDict.save_to_disk: a folder per split
        splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        if split not in splits:
            fail(f"{path} has no split {split!r} (it has: {', '.join(splits)}); choose one with --split")
        path = os.path.join(path, split)
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):  # Dataset.save_to_disk: Arrow stream files listed in order
        with open(state, encoding="utf-8") as f:
            return [os.path.join(path, entry["filename"]) for entry in json.load(f)["_data_files"]]
    files = sorted(f for suffix in DATASET_SUFFIXES
                   for f in glob.glob(os.path.join(path, "**", "*" + suffix), recursive=True))
    # The split is named in the file or folder name: train-00000-of-00002, default/train/0000, x-train.arrow.
    named = re.compile(rf"(^|[\\/._-]){re.escape(split)}([\\/._-]|$)")
    chosen = [f for f in files if named.search(os.path.splitext(os.path.relpath(f, path))[0])]
    if not chosen and not quiet:
        found = ", ".join(os.path.relpath(f, path) for f in files[:5]) or "none"
        fail(f"{path} holds no parquet or Arrow file of split {split!r} (found: {found}); choose one with --split")
    return chosen


def open_arrow(path):
    """Reader of an Arrow stream file, the format `datasets` writes (save_to_disk and its cache)."""
    # Memory-mapped, so reading the text columns does not read the audio bytes.
    return pa.ipc.open_stream(pa.memory_map(path))


def read_batches(path, columns=None):
    """Yield (number of its first row, RecordBatch) through a parquet or Arrow file; only `columns` of parquet
    are read ("audio.path" reads one field of a struct)."""
    if path.endswith(".parquet"):
        batches = pq.ParquetFile(path).iter_batches(batch_size=DATASET_BATCH_ROWS, columns=columns)
    else:
        batches = open_arrow(path)
    start = 0
    for batch in batches:
        yield start, batch
        start += batch.num_rows


def dataset_schema(path):
    return pq.read_schema(path) if path.endswith(".parquet") else open_arrow(path).schema


def is_audio_type(dtype):
    return (pa.types.is_struct(dtype) and dtype.get_field_index("bytes") >= 0) or pa.types.is_binary(dtype) \
        or pa.types.is_large_binary(dtype)


def find_columns(schema, where, audio_column, text_column):
    """(audio column, text column) by name, as Common Voice and its mirrors name them, or as the flags say."""
    names = schema.names
    audio = audio_column or next((c for c in AUDIO_COLUMNS if c in names and is_audio_type(schema.field(c).type)), None)
    text = text_column or next((c for c in TEXT_COLUMNS if c in names), None)
    problem = None
    if audio is None:
        problem = "no audio column (audio or path, holding the clip's bytes; name it with --audio_column)"
    elif text is None:
        problem = f"no text column ({', '.join(TEXT_COLUMNS)}; name it with --text_column)"
    elif audio not in names or text not in names:
        problem = f"no column {(audio if audio not in names else text)!r}"
    elif not is_audio_type(schema.field(audio).type):
        problem = f"column {audio!r} holds {schema.field(audio).type}, not audio (a struct with bytes, or binary)"
    if problem:
        fail(f"{where}: {problem}; its columns: {', '.join(f'{n} ({schema.field(n).type})' for n in names)}")
    return audio, text


def read_hf_dataset(args):
    """Rows of a Hugging Face dataset's split, as read_tsv gives Common Voice's: the text under "sentence",
    "path" locating the audio as FILE#ROW, "name" the output file; the audio itself is read when decoded."""
    folder = download_dataset(args.input, args.split) if not os.path.exists(args.input) else args.input
    files = dataset_files(folder, args.split)
    if os.path.isfile(folder):
        folder = os.path.dirname(folder)
    try:
        schema = dataset_schema(files[0])
        audio, text = find_columns(schema, files[0], args.audio_column, args.text_column)
        extra = [c for c in ROW_COLUMNS if c in schema.names]
        # A string `path` beside the audio struct is Common Voice's clip name; else the struct's own path.
        name_column = "path" if "path" in schema.names and pa.types.is_string(schema.field("path").type) else None
        has_name = pa.types.is_struct(schema.field(audio).type) and schema.field(audio).type.get_field_index("path") >= 0
        columns = [text, *extra] + ([name_column] if name_column else [f"{audio}.path"] if has_name else [])
        rows = []
        for path in files:
            relative = os.path.relpath(path, folder)
            stem = os.path.splitext(os.path.basename(path))[0]
            for start, batch in read_batches(path, columns):
                values = {c: batch.column(c).to_pylist() for c in [text, *extra]}
                names = (batch.column(name_column).to_pylist() if name_column else
                         batch.column(audio).field("path").to_pylist() if has_name else [None] * batch.num_rows)
                for i, name in enumerate(names):
                    row = {c: "" if values[c][i] is None else str(values[c][i]) for c in extra}
                    row.update(path=f"{relative}#{start + i}", sentence=values[text][i] or "",
                               name=output_name(name or f"{stem}_{start + i:06d}"))
                    rows.append(row)
    except (OSError, pa.ArrowException) as err:
        fail(f"cannot read the dataset at {folder}: {err}")
    print(f"dataset: {len(rows)} rows of split {args.split!r} in {len(files)} file(s) under {folder} "
          f"(audio: {audio}, text: {text})")
    return Source("hf_dataset", folder, folder, [], audio), ["path", "sentence", *extra], rows, 0


def dataset_audio(value, folder):
    """One row's audio for load_audio: its bytes, else the local file its path names; None when it has neither."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    if data is not None:
        return io.BytesIO(data)  # empty bytes too: that is an empty file, not a missing one
    if path and os.path.isfile(os.path.join(folder, path)):
        return os.path.join(folder, path)
    return None


def iter_dataset_jobs(source, clips, make_job):
    """Decode jobs for clips of a Hugging Face dataset: each file read once, batch by batch, audio column only."""
    wanted = defaultdict(dict)
    for clip in clips:
        relative, row = clip.source.rsplit("#", 1)
        wanted[relative][int(row)] = clip
    for relative, by_row in wanted.items():
        path = os.path.join(source.clips_dir, relative)
        try:
            for start, batch in read_batches(path, [source.audio_column]):
                audio = batch.column(source.audio_column)
                for i in range(batch.num_rows):
                    clip = by_row.pop(start + i, None)
                    if clip is not None:
                        yield make_job(clip, dataset_audio(audio[i].as_py(), source.clips_dir))
        except (OSError, pa.ArrowException) as err:
            # A damaged file still gives the rows before the damage; the rest count as missing.
            tqdm.write(f"warning: {path}: unreadable past some row ({err})", file=sys.stderr)
        for clip in by_row.values():
            yield make_job(clip, None)


# --------------------------------------------------------------------------- selection


def select_speakers(clips, speakers, top_speakers):
    """Keep the clips of the requested speakers; return (selected, number left out)."""
    if speakers:
        wanted = set(speakers)
        unknown = wanted - {clip.speaker for clip in clips}
        if unknown == wanted:
            fail(f"none of the --speaker ids is in the input (first: {sorted(unknown)[0]})")
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

    Returns (clips, dropped, not_selected, text repairs), each of the last three a Counter by reason.
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
            clips.append(Clip(row["path"], row.get("name") or output_name(row["path"]), row["sentence"],
                              row.get("client_id", "")))
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
    return candidates, dropped, not_selected, repairs


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


# --------------------------------------------------------------------------- decoding


def decode_clip(job):
    """Worker: decode, check and (if kept) write one clip; returns (job id, trimmed samples, reason, detail)."""
    job_id, source, out_path, n_tokens, n_chars, limits, trim, top_db = job
    if source is None:
        return job_id, None, "missing_file", "no such clip in the input"
    try:
        audio = speech.load_audio(source, speech.SAMPLE_RATE, trim=trim, top_db=top_db)
        if speech.is_silent(audio):
            return job_id, None, "silent", f"no sound above {speech.SILENCE_DBFS:.0f} dBFS"
        reason = audio_verdict(len(audio), n_tokens, n_chars, limits)
        if reason is None:
            try:
                speech.write_wav(out_path, audio, speech.SAMPLE_RATE)
            except OSError as err:  # our own output, not the clip, is at fault: the run must stop
                return job_id, None, "write_error", f"cannot write {out_path}: {err.strerror or err}"
        return job_id, len(audio), reason, None
    except speech.AudioError as err:
        return job_id, None, err.reason, str(err)
    except Exception as err:  # one odd clip must never take the whole run down
        return job_id, None, "decode_error", f"{type(err).__name__}: {err}"


def run_jobs(jobs, workers, total):
    """Yield decode_clip results as they finish, `workers` processes in parallel, with a progress bar."""
    if total == 0:
        return
    with tqdm(total=total, unit="clip", desc="decoding", dynamic_ncols=True) as bar:
        if workers <= 1:
            for job in jobs:
                yield decode_clip(job)
                bar.update()
            return
        # librosa imports its resampler lazily (~2 s); doing it once here lets forked workers inherit it.
        librosa.resample(np.zeros(64, dtype=np.float32), orig_sr=32000, target_sr=speech.SAMPLE_RATE)
        with ProcessPoolExecutor(max_workers=workers, **run_folder.worker_setup()) as pool:
            pending = set()
            for job in jobs:
                # Bounded queue: a tarball's clips are read only as fast as they are decoded.
                if len(pending) >= workers * 8:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
                        bar.update()
                pending.add(pool.submit(decode_clip, job))
            for future in wait(pending).done:
                yield future.result()
                bar.update()


def iter_jobs(source, clips, make_job):
    """Decode jobs for `clips`. A tarball is streamed once, in order (twice when clips are link members);
    clips it lacks come last, with no source."""
    if source.kind == "hf_dataset":
        yield from iter_dataset_jobs(source, clips, make_job)
        return
    if source.kind != "tar":
        for clip in clips:
            yield make_job(clip, os.path.join(source.clips_dir, clip.source))
        return
    wanted = {source.clips_dir + clip.source: [clip] for clip in clips}
    # Hard and symbolic link members (GNU tar links repeated files) point at a member that may have
    # passed already: a stream cannot go back, so their targets are read in a second pass.
    for second_pass in (False, True):
        if not wanted:
            return
        links, missing = {}, []
        try:
            with tarfile.open(source.path, "r|*") as tar:
                for member in tar:
                    listed = wanted.pop(member.name, None)
                    if not listed:
                        continue
                    if member.isfile():
                        data = tar.extractfile(member).read()
                        for clip in listed:
                            yield make_job(clip, io.BytesIO(data))
                    elif (member.islnk() or member.issym()) and not second_pass:
                        links.setdefault(link_target(member), []).extend(listed)
                    else:
                        missing.extend(listed)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            # A truncated download still gives the clips before the damage; the rest count as missing.
            tqdm.write(f"warning: {source.path}: archive ends early ({err})", file=sys.stderr)
        for clip in missing + [clip for listed in wanted.values() for clip in listed]:
            yield make_job(clip, None)
        wanted = links


def link_target(member):
    """The member name a tar link member points at (a symlink's target is relative to its folder)."""
    if member.islnk():
        return member.linkname
    return posixpath.normpath(posixpath.join(posixpath.dirname(member.name), member.linkname))


def clip_signature(source, clip):
    """What identifies the clip's audio: the tarball's size and mtime, the clip file's, or its dataset file's
    plus its row (None if missing)."""
    if source.signature:
        return source.signature
    # A dataset row is identified by its file, row number and the file's size and mtime.
    path, row = clip.source.rsplit("#", 1) if source.kind == "hf_dataset" else (clip.source, None)
    try:
        stat = os.stat(os.path.join(source.clips_dir, path))
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns] + ([path, int(row)] if row is not None else [])


def reuse_earlier_work(source, candidates, cache, tokens, limits, wavs_dir):
    """Settle every clip the cache already knows; return ({name: (samples, reason, detail)}, clips to decode)."""
    outcomes, to_decode = {}, []
    for clip in candidates:
        signature = clip_signature(source, clip)
        if signature is None:
            outcomes[clip.name] = (None, "missing_file", "file not found")
            continue
        fact = cache.get(clip.name)
        if fact and fact["source"] == signature:
            if "error" in fact:
                outcomes[clip.name] = (None, fact["error"], fact.get("detail"))
                continue
            verdict = audio_verdict(fact["samples"], tokens[clip.name], len(clip.text), limits)
            wav = os.path.join(wavs_dir, clip.name)
            # A kept clip is reused only if its WAV is the complete one this cache entry describes.
            if verdict or os.path.isfile(wav) and os.path.getsize(wav) == fact["wav_bytes"]:
                outcomes[clip.name] = (fact["samples"], verdict, None)
                continue
        to_decode.append(clip)
    return outcomes, to_decode


def decode_all(args, source, clips, tokens, limits, wavs_dir, outcomes, cache, save_cache):
    """Decode `clips` in parallel, filling `outcomes` and recording what each measured in `cache`."""
    by_name = {clip.name: clip for clip in clips}

    def make_job(clip, clip_source):
        return (clip.name, clip_source, os.path.join(wavs_dir, clip.name), tokens[clip.name], len(clip.text),
                limits, not args.no_trim, args.trim_db)

    results = run_jobs(iter_jobs(source, clips, make_job), args.workers, len(clips))
    for done, (name, samples, reason, detail) in enumerate(results, 1):
        clip = by_name[name]
        if reason == "write_error":
            fail(detail)
        outcomes[name] = (samples, reason, detail)
        if detail:
            tqdm.write(f"warning: {clip.source}: {detail}", file=sys.stderr)
        signature = clip_signature(source, clip)
        if samples is not None:
            wav_bytes = os.path.getsize(os.path.join(wavs_dir, name)) if reason is None else None
            cache[name] = {"source": signature, "samples": samples, "wav_bytes": wav_bytes}
        elif reason != "decode_error" and signature is not None:
            cache[name] = {"source": signature, "error": reason, "detail": detail}
        if done % CACHE_EVERY == 0:
            save_cache()


# --------------------------------------------------------------------------- cache and outputs


def audio_settings(args):
    return {"version": AUDIO_VERSION, "sample_rate": speech.SAMPLE_RATE, "trim": not args.no_trim,
            "trim_db": args.trim_db}


def load_cache(output_dir, settings):
    """Per-clip audio facts from an earlier run with the same audio settings (else empty)."""
    try:
        with open(os.path.join(output_dir, CACHE_NAME), encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    return cache.get("clips", {}) if cache.get("settings") == settings else {}


def write_json(path, data):
    run_folder.write_atomically(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n", durable=False)


def remove_stale_files(wavs_dir, kept_names):
    """Delete WAVs no longer listed (metadata.csv must match the folder) and temp files of killed runs."""
    run_folder.remove_stale_temps(wavs_dir)
    for name in os.listdir(wavs_dir):
        if name.endswith(".wav") and name not in kept_names:
            os.remove(os.path.join(wavs_dir, name))


def summarise(args, source, kept, dropped, not_selected, repairs, decoded, reused, elapsed):
    hours = defaultdict(float)
    clips_per_speaker = Counter()
    for clip, samples in kept:
        hours[clip.speaker or "unknown"] += samples / speech.SAMPLE_RATE / 3600
        clips_per_speaker[clip.speaker or "unknown"] += 1
    speakers = sorted(hours, key=lambda s: (-hours[s], s))
    return {
        "input": os.path.abspath(args.input) if os.path.exists(args.input) else args.input,  # or a Hub id
        "input_kind": source.kind,
        "model": args.model,
        "kept_clips": len(kept),
        "kept_hours": round(sum(hours.values()), 4),
        "dropped_clips": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items())),
        "not_selected": dict(sorted(not_selected.items())),
        "text_repairs": dict(sorted(repairs.items())),
        "speakers": len(speakers),
        "hours_per_speaker": {s: round(hours[s], 4) for s in speakers},
        "clips_per_speaker": {s: clips_per_speaker[s] for s in speakers},
        "decoded_clips": decoded,
        "reused_clips": reused,
        "decode_seconds": round(elapsed, 2),
        "clips_per_second": round(decoded / elapsed, 2) if decoded and elapsed > 0 else None,
        "settings": {k: v for k, v in vars(args).items()},
    }


def print_summary(report, output_dir):
    print(f"kept {report['kept_clips']} clips ({report['kept_hours']:.2f} h) in {output_dir}: "
          f"{report['decoded_clips']} decoded"
          + (f" at {report['clips_per_second']:.1f} clips/s" if report["clips_per_second"] else "")
          + f", {report['reused_clips']} known from an earlier run")
    if report["dropped"]:
        print(f"dropped {report['dropped_clips']} clips:")
        for reason, n in report["dropped"].items():
            print(f"  {reason:<20} {n}")
    for reason, n in report["not_selected"].items():
        print(f"not selected ({reason}): {n}")
    if report["text_repairs"]:
        print("texts repaired: " + ", ".join(f"{what} {n}" for what, n in report["text_repairs"].items()))
    speakers = list(report["hours_per_speaker"].items())
    if speakers:
        print(f"hours per speaker (top {min(10, len(speakers))} of {len(speakers)}):")
        for speaker, h in speakers[:10]:
            print(f"  {speaker[:16]:<16} {h:7.3f} h  {report['clips_per_speaker'][speaker]:6d} clips")
    print(f"report: {os.path.join(output_dir, REPORT_NAME)}")


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="Common Voice language folder (clips/ + validated.tsv), its release tarball "
                             "(.tar/.tar.gz), an LJSpeech folder (wavs/ + metadata.csv), or a Hugging Face "
                             "dataset: a Hub id (owner/name), a folder of parquet files, or a save_to_disk folder.")
    parser.add_argument("--output_dir", default="training", help="Where wavs/, metadata.csv and the report go. (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub name or local folder of the voice; its tokenizer decides which characters "
                             "it can speak. (default: %(default)s)")
    parser.add_argument("--tsv", default="validated.tsv", help="Common Voice clip list to read. (default: %(default)s)")
    parser.add_argument("--split", default="train", help="Split of a Hugging Face dataset. (default: %(default)s)")
    parser.add_argument("--audio_column", default=None,
                        help="Hugging Face dataset column holding the audio. (default: audio, else path)")
    parser.add_argument("--text_column", default=None,
                        help="Column holding the text, of a Hugging Face dataset or a Common Voice TSV; used even "
                             f"where another text column exists. (default: the first of {', '.join(TEXT_COLUMNS)})")
    parser.add_argument("--min_duration", type=float, default=1.0, help="Shortest clip kept, seconds after trimming. (default: %(default)s)")
    parser.add_argument("--max_duration", type=float, default=15.0, help="Longest clip kept, seconds after trimming. (default: %(default)s)")
    parser.add_argument("--min_chars_per_second", type=float, default=4.0,
                        help="Slower speech than this means text and audio do not match. (default: %(default)s)")
    parser.add_argument("--max_chars_per_second", type=float, default=25.0,
                        help="Faster speech than this means text and audio do not match. (default: %(default)s)")
    parser.add_argument("--max_clips", type=int, default=None,
                        help="Prepare at most this many clips: the first ones, in list order, whose text "
                             "passes. (default: all)")
    parser.add_argument("--speaker", action="append", default=[], metavar="CLIENT_ID",
                        help="Only this Common Voice client_id; repeat for several. This chooses whose clips are "
                             "prepared; every kept clip's speaker goes to speakers.csv, and train_vits.py --speakers "
                             "then chooses between one pooled voice and one voice per speaker. (default: every speaker)")
    parser.add_argument("--top_speakers", type=int, default=None, metavar="N",
                        help="Only the N speakers with the most clips in the list (whose clips are prepared; see "
                             "--speaker). (default: every speaker)")
    parser.add_argument("--min_upvotes", type=int, default=None, metavar="N",
                        help="Only clips with at least N up-votes (Common Voice up_votes). (default: no limit: "
                             "every clip of the list, e.g. all Common Voice validated)")
    parser.add_argument("--max_downvotes", type=int, default=None, metavar="N",
                        help="Only clips with at most N down-votes (Common Voice down_votes). (default: no limit)")
    parser.add_argument("--drop_digits", action="store_true",
                        help="Drop transcripts written with digits, as before numbers were read. (default: read "
                             "them as Kurmanji words, 25 as bîst û pênc, counted under texts repaired)")
    parser.add_argument("--no_trim", action="store_true", help="Keep leading and trailing silence. (default: trim it)")
    parser.add_argument("--trim_db", type=float, default=40.0,
                        help="Trim edges quieter than this many dB below the clip's loudest part. (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="Decoding processes; 1 decodes in this process. (default: all cores, %(default)s)")
    args = parser.parse_args(argv)

    if args.min_duration <= 0 or args.max_duration <= args.min_duration:
        parser.error("need 0 < --min_duration < --max_duration")
    if args.min_chars_per_second < 0 or args.max_chars_per_second <= args.min_chars_per_second:
        parser.error("need 0 <= --min_chars_per_second < --max_chars_per_second")
    if args.max_clips is not None and args.max_clips < 1:
        parser.error("--max_clips must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.speaker and args.top_speakers:
        parser.error("use --speaker or --top_speakers, not both")
    if args.top_speakers is not None and args.top_speakers < 1:
        parser.error("--top_speakers must be at least 1")
    for flag in ("min_upvotes", "max_downvotes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            parser.error(f"--{flag} must be at least 0")
    if run_folder.within(args.input, args.output_dir):
        parser.error(f"--input {args.input} lies in --output_dir {args.output_dir} (links followed), where stale "
                     "WAVs are deleted: choose another --output_dir")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        lock = run_folder.OutputLock(args.output_dir).acquire()
    except run_folder.FolderInUse as err:
        fail(str(err))
    # SIGTERM ends the run as Ctrl-C does, through the finally blocks that save the decode cache.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return prepare(args)
    except OSError as err:  # writing our own outputs (a full disk): reading errors are handled where they occur
        for folder in (args.output_dir, os.path.join(args.output_dir, "wavs")):
            run_folder.remove_stale_temps(folder)
        fail(f"{err.filename or args.output_dir}: {err.strerror or err}")
    except KeyboardInterrupt:
        fail("interrupted; the clips decoded so far are remembered: the same command goes on from there")
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.release()


def prepare(args):
    """Steps 1-4 of a run in a locked --output_dir; returns the report."""
    # 1. Read the clip list and the voice's alphabet.
    try:
        if is_hf_dataset(args.input):
            source, header, rows, malformed = read_hf_dataset(args)
        else:
            source, header, rows, malformed = open_input(args.input, args.tsv)
    except (csv.Error, UnicodeDecodeError, OSError) as err:
        fail(f"cannot read the clip list of {args.input}: {err}")
    if args.text_column and source.kind != "hf_dataset":  # (a dataset's rows were read from that column)
        if args.text_column not in header:
            fail(f"--text_column {args.text_column}: {args.input} has no such column (found: {', '.join(header)})")
        rows = [dict(row, sentence=row[args.text_column]) for row in rows]
    missing_columns = [c for c in ("path", "sentence") if c not in header]
    if missing_columns:
        fail(f"{args.tsv} has no {', '.join(missing_columns)} column (found: {', '.join(header) or 'nothing'})")
    if (args.speaker or args.top_speakers) and "client_id" not in header:
        fail("--speaker/--top_speakers need a Common Voice input with a client_id column")
    for flag, column in (("min_upvotes", "up_votes"), ("max_downvotes", "down_votes")):
        if getattr(args, flag) is not None and column not in header:
            fail(f"--{flag} needs a Common Voice input with a {column} column (found: {', '.join(header)})")
    tokenizer, vocab = speech.load_vocab(args.model)

    # 2. Text first: it is cheap, and a clip whose text the voice cannot say is never decoded.
    candidates, dropped, not_selected, repairs = choose_clips(args, rows, malformed, vocab)
    tokens = {clip.name: len(speech.token_ids(tokenizer, clip.text)) for clip in candidates}

    # 3. Reuse what an earlier run measured with the same audio settings; decode the rest in parallel.
    wavs_dir = os.path.join(args.output_dir, "wavs")
    os.makedirs(wavs_dir, exist_ok=True)
    settings = audio_settings(args)
    cache = load_cache(args.output_dir, settings)
    limits = Limits(round(args.min_duration * speech.SAMPLE_RATE), round(args.max_duration * speech.SAMPLE_RATE),
                    args.min_chars_per_second, args.max_chars_per_second)
    outcomes, to_decode = reuse_earlier_work(source, candidates, cache, tokens, limits, wavs_dir)
    reused = sum(reason != "missing_file" for _, reason, _ in outcomes.values())
    start = time.time()

    def save_cache():
        write_json(os.path.join(args.output_dir, CACHE_NAME), {"settings": settings, "clips": cache})

    try:
        decode_all(args, source, to_decode, tokens, limits, wavs_dir, outcomes, cache, save_cache)
    finally:
        save_cache()  # also when interrupted, so the clips decoded so far are not decoded again
    elapsed = time.time() - start

    # 4. Write speakers.csv and metadata.csv in input order, remove WAVs they do not list, report.
    kept, dropped_list = [], []
    for clip in candidates:
        samples, reason, detail = outcomes[clip.name]
        if reason is None:
            kept.append((clip, samples))
        else:
            dropped[reason] += 1
            dropped_list.append({"clip": clip.source, "reason": reason, "detail": detail})
    speakers_csv = os.path.join(args.output_dir, speech.SPEAKERS_FILE)
    if any(clip.speaker for clip, _ in kept):
        speech.write_speaker_labels(speakers_csv, [(clip.name, clip.speaker) for clip, _ in kept])
    elif os.path.isfile(speakers_csv):
        os.remove(speakers_csv)  # another input's speakers must not label these clips
    speech.write_metadata(os.path.join(args.output_dir, "metadata.csv"), [(clip.name, clip.text) for clip, _ in kept])
    remove_stale_files(wavs_dir, {clip.name for clip, _ in kept})
    report = summarise(args, source, kept, dropped, not_selected, repairs, len(to_decode), reused, elapsed)
    report["dropped_list"] = dropped_list
    write_json(os.path.join(args.output_dir, REPORT_NAME), report)
    print_summary(report, args.output_dir)
    if not kept:
        fail(f"no clip was kept from {args.input} (see {os.path.join(args.output_dir, REPORT_NAME)})")
    return report


if __name__ == "__main__":
    main()
