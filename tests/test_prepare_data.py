"""prepare_data.py: what a user relies on when turning a Common Voice release into a training set."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile

import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import prepare_data
from voicetune.common import run_folder
from voicetune.common import speech
from voicetune.data import selection
from voicetune.data import sources
from voicetune.data import training_set
from conftest import GOOD_CLIPS, ROOT, one_error_line, tree
from examples.make_release import BAD_KINDS, write_tsv


def release_rows(release):
    header, rows, _ = sources.read_tsv(os.path.join(release, "validated.tsv"))
    return rows


def test_folder_keeps_every_good_clip_and_counts_each_bad_kind(prepared_dataset, kmr_release, tiny_model_dir):
    report = json.load(open(os.path.join(prepared_dataset, "prepare_report.json")))
    assert report["dropped"] == {kind: 1 for kind in BAD_KINDS}
    assert report["kept_clips"] == GOOD_CLIPS

    good = release_rows(kmr_release)[:GOOD_CLIPS]
    rows = speech.read_metadata(os.path.join(prepared_dataset, "metadata.csv"))
    assert [name for name, _ in rows] == [row["path"].replace(".mp3", ".wav") for row in good]
    assert sorted(os.listdir(os.path.join(prepared_dataset, "wavs"))) == sorted(name for name, _ in rows)

    # The generated release holds the formats Common Voice ships; all of them must come out 16 kHz mono.
    formats = {(sf.info(os.path.join(kmr_release, "clips", row["path"])).samplerate,
                sf.info(os.path.join(kmr_release, "clips", row["path"])).channels) for row in good}
    assert {(32000, 1), (48000, 1), (44100, 2)} <= formats

    tokenizer, vocab = speech.load_vocab(tiny_model_dir)
    for (name, text), row in zip(rows, good):
        info = sf.info(os.path.join(prepared_dataset, "wavs", name))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        source_seconds = sf.info(os.path.join(kmr_release, "clips", row["path"])).duration
        assert 1.0 <= info.duration < source_seconds - 0.3, "leading/trailing silence was not trimmed"
        # The tokenizer keeps every character: nothing is silently dropped at training time.
        assert tokenizer.prepare_for_tokenization(text)[0] == text
        assert set(text) <= vocab and "|" not in text and text == text.strip() and "  " not in text
        assert len(speech.token_ids(tokenizer, text)) == 2 * len(text) + 1 <= info.frames // 256


def run(input_path, model, out, *flags):
    return prepare_data.main(["--input", str(input_path), "--model", model, "--output_dir", str(out), *flags])


def error_line(capsys, call, *args, code=2):
    """The one `error:` line (no traceback) of a run that cannot go on, which exits with `code` as every
    command does: 2, or 130 when interrupted."""
    with pytest.raises(SystemExit) as exit_info:
        call(*args)
    assert exit_info.value.code == code
    return one_error_line(capsys.readouterr().err)


def folder_bytes(folder):
    """Every output file that must be identical between runs, by name."""
    wavs = os.path.join(folder, "wavs")
    files = {name: os.path.join(wavs, name) for name in os.listdir(wavs)}
    files["metadata.csv"] = os.path.join(folder, "metadata.csv")
    if os.path.isfile(os.path.join(folder, "speakers.csv")):  # each clip's Common Voice client_id
        files["speakers.csv"] = os.path.join(folder, "speakers.csv")
    return {name: open(path, "rb").read() for name, path in files.items()}


def test_tarball_is_streamed_and_matches_folder_output(kmr_tarball, prepared_dataset, tiny_model_dir, tmp_path,
                                                      monkeypatch):
    def no_unpacking(*args, **kwargs):
        raise AssertionError("the tarball must be streamed, not unpacked")

    monkeypatch.setattr(tarfile.TarFile, "extractall", no_unpacking)
    monkeypatch.setattr(tarfile.TarFile, "extract", no_unpacking)
    report = run(kmr_tarball, tiny_model_dir, tmp_path, "--workers", "2")

    assert report["input_kind"] == "tar"
    assert report["dropped"] == {kind: 1 for kind in BAD_KINDS}
    assert folder_bytes(tmp_path) == folder_bytes(prepared_dataset)


def test_rerun_decodes_nothing_and_gives_identical_output(prepared_dataset, kmr_release, tiny_model_dir, tmp_path,
                                                         monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(prepared_dataset, out)
    before = folder_bytes(out)
    mtimes = {name: os.stat(out / "wavs" / name).st_mtime_ns for name in os.listdir(out / "wavs")}

    def no_decoding(*args, **kwargs):
        raise AssertionError("a re-run must not decode audio")

    monkeypatch.setattr(speech, "load_audio", no_decoding)
    report = run(kmr_release, tiny_model_dir, out, "--workers", "1")

    assert report["decoded_clips"] == 0
    assert report["kept_clips"] == GOOD_CLIPS and report["dropped"] == {kind: 1 for kind in BAD_KINDS}
    assert folder_bytes(out) == before
    assert {name: os.stat(out / "wavs" / name).st_mtime_ns for name in os.listdir(out / "wavs")} == mtimes


def test_rerun_repairs_folder_and_metadata_always_matches_wavs(prepared_dataset, kmr_release, tiny_model_dir,
                                                              tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared_dataset, out)
    wavs = out / "wavs"
    lost = sorted(os.listdir(wavs))[3]
    os.remove(wavs / lost)
    (wavs / f".{lost}.123.tmp").write_bytes(b"half a wav from a killed run")
    (wavs / "stray.wav").write_bytes(b"not listed anywhere")

    report = run(kmr_release, tiny_model_dir, out, "--workers", "1")
    assert report["decoded_clips"] == 1
    assert folder_bytes(out) == folder_bytes(prepared_dataset)

    # Stricter limits from the cache alone: fewer clips, and the folder shrinks with metadata.csv.
    report = run(kmr_release, tiny_model_dir, out, "--workers", "1", "--max_duration", "2.5")
    names = [name for name, _ in speech.read_metadata(out / "metadata.csv")]
    assert report["decoded_clips"] == 0
    assert 0 < len(names) == report["kept_clips"] < GOOD_CLIPS
    assert sorted(os.listdir(wavs)) == sorted(names)
    assert all(sf.info(wavs / name).duration <= 2.5 for name in names)


def test_changed_audio_settings_decode_again(prepared_dataset, kmr_release, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared_dataset, out)
    report = run(kmr_release, tiny_model_dir, out, "--workers", "1", "--no_trim", "--max_clips", "3")
    # --max_clips counts clips whose text passes: the good ones and the bad ones caught only by their audio.
    audio_bad = len(set(BAD_KINDS) - {"malformed_row", "unreadable_number", "other_script"})
    assert report["decoded_clips"] == 3 and report["not_selected"] == {"max_clips": GOOD_CLIPS + audio_bad - 3}
    trimmed = {name: sf.info(os.path.join(prepared_dataset, "wavs", name)).frames for name in os.listdir(out / "wavs")}
    assert all(sf.info(out / "wavs" / name).frames > frames for name, frames in trimmed.items())


def test_ljspeech_folder_input(prepared_dataset, tiny_model_dir, tmp_path):
    report = run(prepared_dataset, tiny_model_dir, tmp_path / "again", "--workers", "1")
    assert report["input_kind"] == "ljspeech" and report["kept_clips"] == GOOD_CLIPS and report["dropped"] == {}
    assert (speech.read_metadata(tmp_path / "again" / "metadata.csv")
            == speech.read_metadata(os.path.join(prepared_dataset, "metadata.csv")))

    # LJSpeech's own layout: names without .wav and a raw | normalised text pair; the normalised one is used.
    lj = tmp_path / "lj"
    os.makedirs(lj / "wavs")
    first = speech.read_metadata(os.path.join(prepared_dataset, "metadata.csv"))[:2]
    lines = []
    for i, (name, text) in enumerate(first):
        shutil.copy(os.path.join(prepared_dataset, "wavs", name), lj / "wavs" / f"LJ001-000{i}.wav")
        lines.append(f"LJ001-000{i}|RAW TEXT NOT TO USE {i}|{text}")
    (lj / "metadata.csv").write_text("\n".join(lines + ["a line without a separator"]) + "\n", encoding="utf-8")
    report = run(lj, tiny_model_dir, tmp_path / "lj_out", "--workers", "1")
    assert speech.read_metadata(tmp_path / "lj_out" / "metadata.csv") == [
        (f"LJ001-000{i}.wav", text) for i, (_, text) in enumerate(first)]
    assert report["dropped"] == {"malformed_row": 1}


def test_speaker_selection(kmr_release, tiny_model_dir, tmp_path, capsys):
    good = release_rows(kmr_release)[:GOOD_CLIPS]
    counts = {}
    for row in good:
        counts[row["client_id"]] = counts.get(row["client_id"], 0) + 1
    # Most clips first, ties broken by client_id, as --top_speakers ranks them.
    top, other = sorted(counts, key=lambda s: (-counts[s], s))[:2]

    report = run(kmr_release, tiny_model_dir, tmp_path / "top", "--workers", "1", "--top_speakers", "1")
    assert list(report["hours_per_speaker"]) == [top] and report["kept_clips"] == counts[top]
    kept = {name for name, _ in speech.read_metadata(tmp_path / "top" / "metadata.csv")}
    assert kept == {row["path"].replace(".mp3", ".wav") for row in good if row["client_id"] == top}

    report = run(kmr_release, tiny_model_dir, tmp_path / "one", "--workers", "1", "--speaker", other)
    assert list(report["hours_per_speaker"]) == [other] and report["kept_clips"] == counts[other]
    assert report["not_selected"]["other_speakers"] > 0

    assert "none of the --speaker ids" in error_line(capsys, run, kmr_release, tiny_model_dir, tmp_path / "nobody",
                                                     "--speaker", "no-such-speaker")


def test_unusable_input_exits_with_one_line(kmr_release, kmr_tarball, tiny_model_dir, tmp_path, capsys):
    assert "does not exist" in error_line(capsys, run, tmp_path / "nowhere", tiny_model_dir, tmp_path / "out")
    assert "neither validated.tsv" in error_line(capsys, run, tmp_path, tiny_model_dir, tmp_path / "out")

    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(open(kmr_tarball, "rb").read()[:5000])
    assert "cut.tar.gz" in error_line(capsys, run, truncated, tiny_model_dir, tmp_path / "out")

    wrong = tmp_path / "wrong"
    os.makedirs(wrong / "clips")
    (wrong / "validated.tsv").write_text("client_id\tpath\ttext\nx\ty.mp3\thello\n", encoding="utf-8")
    assert "no sentence column" in error_line(capsys, run, wrong, tiny_model_dir, tmp_path / "out")

    # Nothing kept is a failure, but the report still says why.
    assert "no clip was kept" in error_line(capsys, run, kmr_release, tiny_model_dir, tmp_path / "none", "--workers",
                                            "1", "--max_clips", "2", "--min_duration", "30", "--max_duration", "40")
    assert json.load(open(tmp_path / "none" / "prepare_report.json"))["dropped"]["too_short"] == 2


def test_vote_filters_select_exactly_the_rows_with_enough_votes(prepared_dataset, kmr_release, tiny_model_dir,
                                                                tmp_path):
    # The same clips with varied votes; the prepared folder's cache means nothing is decoded again.
    header, rows, _ = sources.read_tsv(os.path.join(kmr_release, "validated.tsv"))
    votes = [("2", "0"), ("1", "0"), ("5", "0"), ("3", "1")]
    for i, row in enumerate(rows):
        row["up_votes"], row["down_votes"] = votes[i % 4]
    release = tmp_path / "voted"
    os.makedirs(release)
    os.symlink(os.path.join(kmr_release, "clips"), release / "clips")
    write_tsv(release / "validated.tsv", header, [[row[c] for c in header] for row in rows])
    out = tmp_path / "out"
    shutil.copytree(prepared_dataset, out)

    report = run(release, tiny_model_dir, out, "--workers", "1", "--min_upvotes", "2", "--max_downvotes", "0")
    kept_rows = [row for i, row in enumerate(rows[:GOOD_CLIPS]) if i % 4 in (0, 2)]
    assert [name for name, _ in speech.read_metadata(out / "metadata.csv")] == [
        row["path"].replace(".mp3", ".wav") for row in kept_rows]
    assert report["not_selected"] == {"too_few_upvotes": sum(i % 4 == 1 for i in range(len(rows))),
                                      "too_many_downvotes": sum(i % 4 == 3 for i in range(len(rows)))}
    assert report["decoded_clips"] == 0
    # Only --min_upvotes: the down-voted clips come back, from the cache.
    report = run(release, tiny_model_dir, out, "--workers", "1", "--min_upvotes", "2")
    assert report["kept_clips"] == sum(i % 4 != 1 for i in range(GOOD_CLIPS))
    assert report["not_selected"] == {"too_few_upvotes": sum(i % 4 == 1 for i in range(len(rows)))}


def write_hub_layout(table, folder):
    """data/train-0000N-of-00002.parquet (two shards, small row groups) and a test split that must be ignored."""
    os.makedirs(folder / "data")
    half = table.num_rows // 2
    for i, shard in enumerate([table.slice(0, half), table.slice(half)]):
        pq.write_table(shard, folder / "data" / f"train-{i:05d}-of-00002.parquet", row_group_size=4)
    # Were the test split read, its row would be counted as a duplicate.
    pq.write_table(table.slice(0, 1), folder / "data" / "test-00000-of-00001.parquet")
    (folder / "README.md").write_text("---\nlicense: cc0-1.0\n---\n", encoding="utf-8")
    return folder


VOTES = [(2, 0), (1, 0), (5, 0), (3, 1)]  # (up, down) of row i: VOTES[i % 4]


def dataset_table(release, layout, rows=None):
    """The release's clip list as a Hugging Face dataset: Common Voice's export ("cv": `audio` struct,
    `path` name, `sentence`, votes) or a mirror's ("mirror": `path` struct, `text`); varied votes."""
    rows = release_rows(release) if rows is None else rows
    audio = []
    for row in rows:
        clip = os.path.join(release, "clips", row["path"])
        audio.append({"bytes": open(clip, "rb").read() if os.path.exists(clip) else None, "path": row["path"]})
    audio = pa.array(audio, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    if layout == "mirror":
        return pa.table({"path": audio, "text": [row["sentence"] for row in rows]})
    return pa.table({"client_id": [row["client_id"] for row in rows], "path": [row["path"] for row in rows],
                     "audio": audio, "sentence": [row["sentence"] for row in rows],
                     "up_votes": pa.array([VOTES[i % 4][0] for i in range(len(rows))], pa.int64()),
                     "down_votes": pa.array([VOTES[i % 4][1] for i in range(len(rows))], pa.int64()),
                     "gender": [""] * len(rows)})


def test_parquet_in_common_voice_export_layout_prepares_like_the_folder(prepared_dataset, kmr_release,
                                                                       tiny_model_dir, tmp_path, monkeypatch,
                                                                       spawn_start_method):
    dataset = write_hub_layout(dataset_table(kmr_release, "cv"), tmp_path / "dataset")
    monkeypatch.setattr(sources, "DATASET_BATCH_ROWS", 3)  # many batches: row numbers must carry over
    report = run(dataset, tiny_model_dir, tmp_path / "out", "--workers", "2")  # decoded in spawned workers
    assert report["input_kind"] == "hf_dataset"
    # The same clips, bytes and texts as from the folder; the malformed TSV row has no dataset equivalent.
    assert report["dropped"] == {kind: 1 for kind in BAD_KINDS if kind != "malformed_row"}
    assert folder_bytes(tmp_path / "out") == folder_bytes(prepared_dataset)
    assert report["decoded_clips"] == GOOD_CLIPS + len(BAD_KINDS) - 3  # all but malformed, unreadable_number, other_script

    # Re-run with the user's vote filters: nothing decoded (known by dataset file + row), the right rows kept.
    monkeypatch.setattr(speech, "load_audio", lambda *a, **k: pytest.fail("a re-run must not decode"))
    report = run(dataset, tiny_model_dir, tmp_path / "out", "--workers", "1", "--min_upvotes", "2",
                 "--max_downvotes", "0")
    rows = release_rows(kmr_release)
    assert [name for name, _ in speech.read_metadata(tmp_path / "out" / "metadata.csv")] == [
        row["path"].replace(".mp3", ".wav") for i, row in enumerate(rows[:GOOD_CLIPS]) if VOTES[i % 4] in VOTES[::2]]
    assert report["decoded_clips"] == 0 and report["not_selected"] == {
        "too_few_upvotes": sum(i % 4 == 1 for i in range(len(rows))),
        "too_many_downvotes": sum(i % 4 == 3 for i in range(len(rows)))}


def test_parquet_in_mirror_layout_from_the_hub_prepares_like_the_folder(prepared_dataset, kmr_release,
                                                                       tiny_model_dir, tmp_path, monkeypatch):
    snapshot = write_hub_layout(dataset_table(kmr_release, "mirror"), tmp_path / "snapshot")
    report = run(snapshot, tiny_model_dir, tmp_path / "out", "--workers", "1")
    assert report["dropped"] == {kind: 1 for kind in BAD_KINDS if kind != "malformed_row"}
    # A mirror without client_id has no speakers: the same clips, and no speakers.csv.
    same_clips = {name: data for name, data in folder_bytes(prepared_dataset).items() if name != "speakers.csv"}
    assert folder_bytes(tmp_path / "out") == same_clips

    # A Hub id: the split's parquet files are downloaded once into the Hugging Face cache, then read as above.
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    report = run("someone/kurmanji-mirror", tiny_model_dir, tmp_path / "out", "--workers", "1")
    assert calls == [("someone/kurmanji-mirror", {"repo_type": "dataset", "allow_patterns": ["*train*.parquet"]})]
    assert report["input"] == "someone/kurmanji-mirror" and report["decoded_clips"] == 0
    assert folder_bytes(tmp_path / "out") == same_clips


def test_save_to_disk_folder_with_its_own_column_names(prepared_dataset, kmr_release, tiny_model_dir, tmp_path,
                                                       capsys):
    # DatasetDict.save_to_disk: dataset_dict.json and a folder per split of Arrow stream files + state.json.
    rows = release_rows(kmr_release)[:3]
    table = dataset_table(kmr_release, "mirror", rows).rename_columns(["speech", "words"])
    saved = tmp_path / "saved"
    for split in ("train", "test"):
        os.makedirs(saved / split)
        with pa.ipc.new_stream(str(saved / split / "data-00000-of-00001.arrow"), table.schema) as writer:
            writer.write_table(table if split == "train" else table.slice(0, 1), max_chunksize=2)
        (saved / split / "state.json").write_text(json.dumps(
            {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split}), encoding="utf-8")
    (saved / "dataset_dict.json").write_text('{"splits": ["train", "test"]}', encoding="utf-8")

    message = error_line(capsys, run, saved, tiny_model_dir, tmp_path / "out", "--workers", "1")
    assert "\n" not in message and "no audio column" in message and "speech (struct<bytes: binary" in message
    assert "words (string)" in message

    report = run(saved, tiny_model_dir, tmp_path / "out", "--workers", "1", "--audio_column", "speech",
                 "--text_column", "words")
    names = [row["path"].replace(".mp3", ".wav") for row in rows]
    assert report["kept_clips"] == 3 and folder_bytes(tmp_path / "out") == {
        name: data for name, data in folder_bytes(prepared_dataset).items() if name in names or name == "metadata.csv"
    } | {"metadata.csv": "".join(f"{n}|{t}\n" for n, t in speech.read_metadata(
        os.path.join(prepared_dataset, "metadata.csv"))[:3]).encode()}


def test_tsv_with_unbalanced_quotes_is_read_by_header_name(tmp_path):
    # Columns in another order than usual; default csv quoting would swallow the rows after the lone '"'.
    lines = ["sentence\tup_votes\tpath\tclient_id",
             '"Ez naçim malê, wî got.\t2\ta.mp3\ts1',
             'Ew got \\"erê\\".\t2\tb.mp3\ts1',
             "“Rojbaş,” wê got.\t2\tc.mp3\ts2",
             "too\tfew",
             "Dara sêvê li ber malê ye.\t2\td.mp3\ts2"]
    (tmp_path / "validated.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    header, rows, malformed = sources.read_tsv(str(tmp_path / "validated.tsv"))
    assert [row["path"] for row in rows] == ["a.mp3", "b.mp3", "c.mp3", "d.mp3"]
    assert rows[0]["sentence"] == '"Ez naçim malê, wî got.' and rows[1]["sentence"] == 'Ew got \\"erê\\".'
    assert malformed == 1


def test_prepare_rerun_decodes_a_source_replaced_by_audio_of_the_same_size(kmr_release, prepared_dataset,
                                                                           tiny_model_dir, tmp_path):
    release, out = tmp_path / "release", tmp_path / "out"
    shutil.copytree(kmr_release, release)  # copy2: sizes and mtimes kept, so the copied cache still holds
    shutil.copytree(prepared_dataset, out)
    with open(os.path.join(prepared_dataset, "metadata.csv"), encoding="utf-8") as f:
        name = f.readline().split("|", 1)[0]
    source = release / "clips" / (os.path.splitext(name)[0] + ".mp3")
    assert source.is_file()
    # The clip's source as mono 16-bit WAV at its own rate (libsndfile reads it by its header, not its name).
    pcm, sr = sf.read(str(source), dtype="int16")
    pcm = pcm if pcm.ndim == 1 else pcm[:, 0]
    sf.write(str(source), pcm, sr, format="WAV", subtype="PCM_16")
    flags = ["--model", tiny_model_dir, "--output_dir", str(out), "--workers", "1"]
    report = prepare_data.main(["--input", str(release), *flags])
    assert report["decoded_clips"] == 1
    before, _ = sf.read(str(out / "wavs" / name), dtype="int16")
    assert np.abs(before).max() > 1000

    # Replaced by other audio of exactly the same size: the same samples negated, a new mtime.
    size, mtime = os.path.getsize(source), os.stat(source).st_mtime_ns
    sf.write(str(source), np.clip(-pcm.astype(np.int32), -32768, 32767).astype(np.int16), sr, format="WAV",
             subtype="PCM_16")
    os.utime(source, ns=(mtime + 5 * 10 ** 9, mtime + 5 * 10 ** 9))
    assert os.path.getsize(source) == size
    report = prepare_data.main(["--input", str(release), *flags])
    assert report["decoded_clips"] == 1
    after, _ = sf.read(str(out / "wavs" / name), dtype="int16")
    # Negation commutes with trimming (power) and rounding: the new output is the old one negated.
    assert len(after) == len(before)
    assert np.abs(after.astype(np.int32) + before.astype(np.int32)).max() <= 1
    assert not np.array_equal(after, before)


def test_tarball_link_members_are_read_from_their_targets(kmr_release, tiny_model_dir, tmp_path):
    release = str(tmp_path / "kmr")
    shutil.copytree(kmr_release, release)
    header, rows, _ = sources.read_tsv(os.path.join(release, "validated.tsv"))
    first = rows[0]
    # GNU tar stores a repeated file as a hard link to its first copy, here after it in the archive.
    os.link(os.path.join(release, "clips", first["path"]), os.path.join(release, "clips", "zz_hard.mp3"))
    os.symlink(first["path"], os.path.join(release, "clips", "zz_soft.mp3"))
    rows = [dict(first, path="zz_hard.mp3"), dict(first, path="zz_soft.mp3"), dict(first, path="zz_gone.mp3")]
    with open(os.path.join(release, "validated.tsv"), "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n" + "".join("\t".join(r[c] for c in header) + "\n" for r in rows))
    os.symlink("/nowhere/clip.mp3", os.path.join(release, "clips", "zz_gone.mp3"))
    tarball = str(tmp_path / "cv.tar")
    with tarfile.open(tarball, "w") as tar:
        tar.add(release, arcname="cv-corpus-99.0-2026-01-01/kmr")
    kinds = {m.name.rsplit("/", 1)[-1]: m.type for m in tarfile.open(tarball).getmembers()}
    assert kinds["zz_hard.mp3"] == tarfile.LNKTYPE and kinds["zz_soft.mp3"] == tarfile.SYMTYPE

    out = str(tmp_path / "out")
    report = prepare_data.main(["--input", tarball, "--model", tiny_model_dir, "--output_dir", out, "--workers", "1"])
    assert report["kept_clips"] == 2 and report["dropped"] == {"missing_file": 1}
    with open(os.path.join(out, "metadata.csv"), encoding="utf-8") as f:
        assert [line.split("|")[0] for line in f] == ["zz_hard.wav", "zz_soft.wav"]


def test_prepare_data_refuses_an_output_dir_reaching_the_input_through_a_link(prepared_dataset, tiny_model_dir,
                                                                            tmp_path, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(prepared_dataset, data)
    link = str(tmp_path / "link")
    try:
        os.symlink(data, link, target_is_directory=True)
    except OSError:
        pytest.skip("no permission to make symlinks here")
    before = tree(data)
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(["--input", data, "--model", tiny_model_dir, "--output_dir", link, "--max_clips", "1"])
    assert exit_info.value.code == 2
    assert "lies in --output_dir" in capsys.readouterr().err
    assert tree(data) == before


def test_a_bad_input_ends_the_command_in_one_line_and_exit_code_2(tiny_model_dir, tmp_path):
    """As train_vits.py, train_feedback.py and speak.py end: `error: ...` alone on stderr, exit code 2."""
    def prepare(input_path):
        return subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--input", str(input_path),
                               "--model", tiny_model_dir, "--output_dir", str(tmp_path / "out")], cwd=ROOT,
                              capture_output=True, text=True)

    proc = prepare(tmp_path / "nowhere")
    assert (proc.returncode, proc.stderr) == (2, f"error: --input {tmp_path / 'nowhere'} does not exist\n")

    latin1 = tmp_path / "latin1"  # an LJSpeech folder whose metadata.csv is not UTF-8
    os.makedirs(latin1 / "wavs")
    (latin1 / "metadata.csv").write_bytes("a|Ez ê biçim\n".encode("latin-1"))
    proc = prepare(latin1)
    assert proc.returncode == 2
    assert re.fullmatch(r"error: cannot read the clip list of .+latin1: .+metadata\.csv: not UTF-8 text .*\n",
                        proc.stderr), proc.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="RLIMIT_FSIZE is POSIX")
def test_prepare_data_stops_in_one_line_when_its_outputs_cannot_be_written(kmr_release, tiny_model_dir, tmp_path):
    import resource

    def small_files_only():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30000, 30000))  # every WAV is larger: as a full disk

    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--input", kmr_release, "--model",
                           tiny_model_dir, "--output_dir", out, "--workers", "1"], cwd=ROOT, capture_output=True,
                          text=True, preexec_fn=small_files_only)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(r"error: cannot write \S+\.wav: File too large$", errors[0]), errors
    assert not os.path.exists(os.path.join(out, "metadata.csv"))
    assert [name for name in os.listdir(os.path.join(out, "wavs")) if name.startswith(".")] == []


def test_sigterm_keeps_what_prepare_data_decoded(kmr_release, tiny_model_dir, tmp_path, monkeypatch, capsys):
    decode = training_set.decode_clip
    calls = []

    def decode_then_sigterm(job):
        calls.append(job)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a shutdown or `kill` would, mid-run
        return decode(job)

    monkeypatch.setattr(training_set, "decode_clip", decode_then_sigterm)
    out = str(tmp_path / "out")
    line = error_line(capsys, prepare_data.main, ["--input", kmr_release, "--model", tiny_model_dir,
                                                  "--output_dir", out, "--workers", "1"], code=130)
    assert "interrupted" in line
    # What to do next is prepare's own: it has no --resume, the same command goes on.
    assert line == "error: interrupted; the clips decoded so far are remembered: the same command goes on from there"
    with open(os.path.join(out, training_set.CACHE_NAME), encoding="utf-8") as f:
        assert len(json.load(f)["clips"]) >= 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert not os.path.exists(os.path.join(out, run_folder.LOCK_NAME))


def test_a_transcript_with_digits_is_read_as_words_and_counted(prepared_dataset, tiny_model_dir, tmp_path):
    """"25" in a transcript trains as bîst û pênc (counted under texts repaired); --drop_digits drops it."""
    folder = tmp_path / "lj"
    shutil.copytree(os.path.join(prepared_dataset, "wavs"), folder / "wavs")
    (name, _), *rest = speech.read_metadata(os.path.join(prepared_dataset, "metadata.csv"))
    speech.write_metadata(folder / "metadata.csv", [(name, "Ez 25 salî me")] + rest[:2])
    report = run(folder, tiny_model_dir, tmp_path / "read", "--workers", "1", "--max_chars_per_second", "60")
    rows = dict(speech.read_metadata(tmp_path / "read" / "metadata.csv"))
    assert rows[name] == "ez bîst û pênc salî me"
    assert report["text_repairs"] == {"numbers read as words": 1}

    report = run(folder, tiny_model_dir, tmp_path / "dropped", "--workers", "1", "--max_chars_per_second", "60",
                 "--drop_digits")
    assert name not in dict(speech.read_metadata(tmp_path / "dropped" / "metadata.csv"))
    assert report["dropped"] == {"digits": 1}


# ----------------------------------------------------------------------- --text_column, empty votes

WRONG = "Ev ne ew hevok e."  # a speakable text that is not what the clips say


def first_rows(release, n):
    return sources.read_tsv(os.path.join(release, "validated.tsv"))[1][:n]


def prepared_texts(prepared_dataset, rows):
    """What the release's own `sentence` of these rows became in the prepared folder: the reference."""
    texts = dict(speech.read_metadata(os.path.join(prepared_dataset, "metadata.csv")))
    return [(row["path"].replace(".mp3", ".wav"), texts[row["path"].replace(".mp3", ".wav")]) for row in rows]


def prepare_into(input_path, model, out, *flags):
    report = prepare_data.main(["--input", str(input_path), "--model", model, "--output_dir", str(out),
                                "--workers", "1", *flags])
    return report, speech.read_metadata(os.path.join(out, "metadata.csv"))


def test_text_column_and_empty_votes_in_a_common_voice_tsv(kmr_release, prepared_dataset, tiny_model_dir, tmp_path,
                                                          capsys):
    rows = first_rows(kmr_release, 3)
    folder = tmp_path / "cv"
    os.makedirs(folder / "clips")
    for row in rows:
        shutil.copy(os.path.join(kmr_release, "clips", row["path"]), folder / "clips")
    votes = [("", ""), ("1", ""), ("", "1")]  # (up, down): empty fields are no votes
    with open(folder / "validated.tsv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["client_id", "path", "sentence", "up_votes", "down_votes", "kurmanji"])
        for row, (up, down) in zip(rows, votes):
            writer.writerow([row["client_id"], row["path"], WRONG, up, down, row["sentence"]])
    report, metadata = prepare_into(folder, tiny_model_dir, tmp_path / "out", "--text_column", "kurmanji",
                               "--max_downvotes", "0")
    assert metadata == prepared_texts(prepared_dataset, rows[:2])
    assert report["not_selected"] == {"too_many_downvotes": 1}
    # A column the TSV does not have is one line, not the `sentence` column instead.
    message = error_line(capsys, prepare_into, folder, tiny_model_dir, tmp_path / "out2", "--text_column", "kurmanj")
    assert "--text_column kurmanj" in message and "\n" not in message


def test_text_column_and_empty_votes_in_a_hugging_face_dataset(kmr_release, prepared_dataset, tiny_model_dir,
                                                               tmp_path):
    rows = first_rows(kmr_release, 3)
    audio = pa.array([{"bytes": open(os.path.join(kmr_release, "clips", row["path"]), "rb").read(),
                       "path": row["path"]} for row in rows],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"audio": audio, "sentence": [WRONG] * 3, "text": [WRONG] * 3,
                      "kurmanji": [row["sentence"] for row in rows],
                      "up_votes": pa.array([None, 2, 0], pa.int64()), "down_votes": pa.array([None, 0, 3], pa.int64())})
    os.makedirs(tmp_path / "dataset" / "data")
    pq.write_table(table, tmp_path / "dataset" / "data" / "train-00000-of-00001.parquet")
    report, metadata = prepare_into(tmp_path / "dataset", tiny_model_dir, tmp_path / "out", "--text_column", "kurmanji",
                               "--max_downvotes", "0")
    assert [text for _, text in metadata] == [text for _, text in prepared_texts(prepared_dataset, rows[:2])]
    assert report["not_selected"] == {"too_many_downvotes": 1}


def test_an_empty_vote_field_counts_as_no_votes():
    rows = [dict(up_votes="", down_votes=""), dict(up_votes="2", down_votes="1"), dict(up_votes=" ", down_votes=" "),
            dict(up_votes="x", down_votes="x")]  # the last is no number: never selected by a vote filter
    assert selection.select_by_votes(rows, 1, None) == ([rows[1]], {"too_few_upvotes": 3})
    assert selection.select_by_votes(rows, 0, None) == (rows[:3], {"too_few_upvotes": 1})
    assert selection.select_by_votes(rows, None, 0) == ([rows[0], rows[2]], {"too_many_downvotes": 2})
    assert selection.select_by_votes(rows, None, None) == (rows, {})
