"""The inputs prepare_data.py reads, one reader per kind, each giving the same clip list and clip audio.

A Common Voice language folder (`clips/` + a TSV), its release tarball (streamed, never unpacked to disk), an
LJSpeech-style folder (`wavs/` + `metadata.csv`) or a Hugging Face dataset (a Hub id, parquet shards or a
save_to_disk folder, read with pyarrow in batches). `read_clip_list` gives each input's rows as Common Voice's
TSV has them (`path`, `sentence`, and `client_id`, votes where the input has them); `clip_audio` then gives
each chosen clip's audio, a file path or bytes that soundfile reads, and `clip_signature` what identifies it
for the re-run cache.
"""

import csv
import glob
import io
import json
import os
import posixpath
import re
import sys
import tarfile
import zlib
from collections import defaultdict
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from voicetune.common import run_errors
from voicetune.common import speech

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# Hugging Face datasets: column names Common Voice exports and their mirrors use, in order of preference.
AUDIO_COLUMNS = ("audio", "path")  # a struct of the clip's bytes and file name
TEXT_COLUMNS = ("sentence", "text", "normalized_text", "transcription")
ROW_COLUMNS = ("client_id", "up_votes", "down_votes", "gender")
DATASET_SUFFIXES = (".parquet", ".arrow")
DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")  # save_to_disk / datasets cache
DATASET_BATCH_ROWS = 64  # rows read at a time: the compressed audio of a whole dataset never sits in RAM
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def read_clip_list(args):
    """Identify --input and read its clip list; return (Source, header, rows, malformed rows).

    Every row has the clip's `path` and its text under `sentence` (from --text_column where given); a
    Hugging Face dataset's rows also `name`, the output file.
    """
    try:
        if is_hf_dataset(args.input):
            source, header, rows, malformed = read_hf_dataset(args)
        else:
            source, header, rows, malformed = open_input(args.input, args.tsv)
    except (csv.Error, UnicodeDecodeError, speech.MetadataError, OSError) as err:
        raise run_errors.TrainingError(f"cannot read the clip list of {args.input}: {err}") from None
    if args.text_column and source.kind != "hf_dataset":  # (a dataset's rows were read from that column)
        if args.text_column not in header:
            raise run_errors.TrainingError(f"--text_column {args.text_column}: {args.input} has no such column "
                                           f"(found: {', '.join(header)})")
        rows = [dict(row, sentence=row[args.text_column]) for row in rows]
    missing_columns = [c for c in ("path", "sentence") if c not in header]
    if missing_columns:
        raise run_errors.TrainingError(f"{args.tsv} has no {', '.join(missing_columns)} column "
                                       f"(found: {', '.join(header) or 'nothing'})")
    return source, header, rows, malformed


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
    """A Common Voice folder or tarball, or an LJSpeech folder, and its clip list: (Source, header, rows, malformed)."""
    if not os.path.exists(path):
        raise run_errors.TrainingError(f"--input {path} does not exist")
    if os.path.isfile(path):
        if not (path.endswith(TAR_SUFFIXES) or tarfile.is_tarfile(path)):
            raise run_errors.TrainingError(f"--input {path} is a file but not a .tar/.tar.gz Common Voice release")
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
    raise run_errors.TrainingError(f"--input {path} holds neither {tsv} (Common Voice) nor wavs/ + metadata.csv "
                                   "(LJSpeech)")


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
        raise run_errors.TrainingError(f"cannot read tarball {path}: {err}") from None
    raise run_errors.TrainingError(f"tarball {path} holds no {tsv}")


def output_name(source_path):
    stem = os.path.splitext(os.path.basename(source_path))[0]
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem) + ".wav"

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
    except run_errors.TrainingError:
        raise  # dataset_files' own refusal names the split the snapshot lacks
    except Exception as err:  # offline, unknown repo, gated: huggingface_hub raises many kinds
        raise run_errors.TrainingError(f"--input {repo_id} is no local path, and as a Hugging Face Hub dataset: "
                                       f"{type(err).__name__}: {err}") from None
    return folder


def dataset_files(path, split, quiet=False):
    """The parquet or Arrow files holding `split` of the dataset at `path` (a folder or one file), in order."""
    if os.path.isfile(path):
        return [path]
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):  # DatasetDict.save_to_disk: a folder per split
        splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        if split not in splits:
            raise run_errors.TrainingError(f"{path} has no split {split!r} (it has: {', '.join(splits)}); "
                                           "choose one with --split")
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
        raise run_errors.TrainingError(f"{path} holds no parquet or Arrow file of split {split!r} (found: {found}); "
                                       "choose one with --split")
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
        columns = ", ".join(f"{n} ({schema.field(n).type})" for n in names)
        raise run_errors.TrainingError(f"{where}: {problem}; its columns: {columns}")
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
        raise run_errors.TrainingError(f"cannot read the dataset at {folder}: {err}") from None
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


def dataset_clip_audio(source, clips):
    """(clip, audio) for clips of a Hugging Face dataset: each file read once, batch by batch, audio column only."""
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
                        yield clip, dataset_audio(audio[i].as_py(), source.clips_dir)
        except (OSError, pa.ArrowException) as err:
            # A damaged file still gives the rows before the damage; the rest count as missing.
            tqdm.write(f"warning: {path}: unreadable past some row ({err})", file=sys.stderr)
        for clip in by_row.values():
            yield clip, None


def clip_audio(source, clips):
    """(clip, audio) for each of `clips`, the audio a path or bytes for speech.load_audio. A tarball is streamed
    once, in order (twice when clips are link members); clips an input lacks come last, with None for audio."""
    if source.kind == "hf_dataset":
        yield from dataset_clip_audio(source, clips)
        return
    if source.kind != "tar":
        for clip in clips:
            yield clip, os.path.join(source.clips_dir, clip.source)
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
                            yield clip, io.BytesIO(data)
                    elif (member.islnk() or member.issym()) and not second_pass:
                        links.setdefault(link_target(member), []).extend(listed)
                    else:
                        missing.extend(listed)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            # A truncated download still gives the clips before the damage; the rest count as missing.
            tqdm.write(f"warning: {source.path}: archive ends early ({err})", file=sys.stderr)
        for clip in missing + [clip for listed in wanted.values() for clip in listed]:
            yield clip, None
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

