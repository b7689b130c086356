"""prepare_data.py: what a user relies on when turning a Common Voice release into a training set."""

import io
import json
import os
import shutil
import tarfile
from collections import Counter

import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import prepare_data
import speech
from examples.make_release import BAD_KINDS, espeak_clip, write_tsv
from tests.conftest import GOOD_CLIPS


def run(input_path, model, out, *flags):
    return prepare_data.main(["--input", str(input_path), "--model", model, "--output_dir", str(out), *flags])


def folder_bytes(folder):
    """Every output file that must be identical between runs, by name."""
    wavs = os.path.join(folder, "wavs")
    files = {name: os.path.join(wavs, name) for name in os.listdir(wavs)}
    files["metadata.csv"] = os.path.join(folder, "metadata.csv")
    if os.path.isfile(os.path.join(folder, "speakers.csv")):  # each clip's Common Voice client_id
        files["speakers.csv"] = os.path.join(folder, "speakers.csv")
    return {name: open(path, "rb").read() for name, path in files.items()}


def release_rows(release):
    header, rows, _ = prepare_data.read_tsv(os.path.join(release, "validated.tsv"))
    return rows


# --------------------------------------------------------------------------- end to end


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


def test_speaker_selection(kmr_release, tiny_model_dir, tmp_path):
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

    with pytest.raises(SystemExit, match="none of the --speaker ids"):
        run(kmr_release, tiny_model_dir, tmp_path / "nobody", "--speaker", "no-such-speaker")


# --------------------------------------------------------------------------- input errors


def test_unusable_input_exits_with_one_line(kmr_release, kmr_tarball, tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        run(tmp_path / "nowhere", tiny_model_dir, tmp_path / "out")
    with pytest.raises(SystemExit, match="neither validated.tsv"):
        run(tmp_path, tiny_model_dir, tmp_path / "out")

    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(open(kmr_tarball, "rb").read()[:5000])
    with pytest.raises(SystemExit, match="cut.tar.gz"):
        run(truncated, tiny_model_dir, tmp_path / "out")

    wrong = tmp_path / "wrong"
    os.makedirs(wrong / "clips")
    (wrong / "validated.tsv").write_text("client_id\tpath\ttext\nx\ty.mp3\thello\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no sentence column"):
        run(wrong, tiny_model_dir, tmp_path / "out")

    # Nothing kept is a failure, but the report still says why.
    with pytest.raises(SystemExit, match="no clip was kept"):
        run(kmr_release, tiny_model_dir, tmp_path / "none", "--workers", "1", "--max_clips", "2",
            "--min_duration", "30", "--max_duration", "40")
    assert json.load(open(tmp_path / "none" / "prepare_report.json"))["dropped"]["too_short"] == 2


def test_vote_filters_select_exactly_the_rows_with_enough_votes(prepared_dataset, kmr_release, tiny_model_dir,
                                                                tmp_path):
    # The same clips with varied votes; the prepared folder's cache means nothing is decoded again.
    header, rows, _ = prepare_data.read_tsv(os.path.join(kmr_release, "validated.tsv"))
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


# --------------------------------------------------------------------------- Hugging Face datasets


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


def test_parquet_in_common_voice_export_layout_prepares_like_the_folder(prepared_dataset, kmr_release,
                                                                       tiny_model_dir, tmp_path, monkeypatch,
                                                                       spawn_start_method):
    dataset = write_hub_layout(dataset_table(kmr_release, "cv"), tmp_path / "dataset")
    monkeypatch.setattr(prepare_data, "DATASET_BATCH_ROWS", 3)  # many batches: row numbers must carry over
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

    with pytest.raises(SystemExit) as err:
        run(saved, tiny_model_dir, tmp_path / "out", "--workers", "1")
    message = str(err.value)
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
    header, rows, malformed = prepare_data.read_tsv(str(tmp_path / "validated.tsv"))
    assert [row["path"] for row in rows] == ["a.mp3", "b.mp3", "c.mp3", "d.mp3"]
    assert rows[0]["sentence"] == '"Ez naçim malê, wî got.' and rows[1]["sentence"] == 'Ew got \\"erê\\".'
    assert malformed == 1


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("raw, expected", [
    ("Em ê sibê biçin Wan’ê.", "em ê sibê biçin wan'ê"),
    ("“Rojbaş,” jinikê got.", "rojbaş jinikê got"),
    ("Wî got: \"Ez naçim malê.", "wî got ez naçim malê"),
    ("’’Were!’’ got.", "were got"),
    ("- Tu çawa yî? – Ez baş im…", "tu çawa yî ez baş im"),
    ("İro DAYIKA mın", "iro dayika min"),
    ("S\u0327ev  dirêj\tbû", "şev dirêj bû"),
    ("a|b", "a b"),
    ("Kurdistan-ê xweş e", "kurdistan-ê xweş e"),
    ("bajêr,gund", "bajêr gund"),
    # Letters from other keyboards and quotes typed as apostrophes, as the real corpus holds them.
    ("Ez dīnim ū tu dērî", "ez dînim û tu dêrî"),
    ("Erdoğan û Gök hatin", "erdogan û gok hatin"),
    ("D\u0430r\u0430 s\u0435vê \u043e zar\u043ek", "dara sevê o zarok"),
    ('Wî got "ez"ê nizanim', "wî got ezê nizanim"),
    ("“Azadî”yê û «Kurdistan»ê", "azadîyê û kurdistanê"),
    ('got"ez', "got ez"),
    ("‘bavo’ hat", "bavo hat"),
    ("Tîpa 'W' ye", "tîpa w ye"),
    ("Qur’an û Qur'an", "qur'an û qur'an"),
])
def test_clean_text_gives_text_the_tokenizer_keeps_whole(raw, expected, tiny_model_dir):
    tokenizer, vocab = speech.load_vocab(tiny_model_dir)
    text, reason = speech.clean_text(raw, vocab)
    assert (text, reason) == (expected, None)
    assert tokenizer.prepare_for_tokenization(text)[0] == text


@pytest.mark.parametrize("raw, reason", [
    ("Ew $25 e.", "unreadable_number"),
    ("ئەمڕۆ هەوا خۆشە", "other_script"),
    ("Привет", "other_script"),
    ("Müzîk û dar", "unsupported_letter"),
    # A Cyrillic word only of Latin look-alikes stays Cyrillic; so does one beside other Cyrillic letters.
    ("\u0441\u043e\u0440\u043e\u043a", "other_script"),
    ("Ez \u0441\u043e\u0440\u043e\u043a \u043f\u0430", "other_script"),
    ("“…” - !", "empty_text"),
])
def test_clean_text_drops_what_the_voice_cannot_say(raw, reason, tiny_model_dir):
    _, vocab = speech.load_vocab(tiny_model_dir)
    assert speech.clean_text(raw, vocab) == (None, reason)


def test_clean_text_counts_every_repair_of_a_kept_text(tiny_model_dir):
    _, vocab = speech.load_vocab(tiny_model_dir)
    repairs = Counter()
    speech.clean_text("Rīya dīrok û ‘b\u0430vo’ \"ez\"ê", vocab, repairs)
    speech.clean_text("Dīrok $25", vocab, repairs)  # dropped (unreadable_number): its repairs are not counted
    assert repairs == {"ī→î": 2, "а→a (Cyrillic)": 1, "apostrophe used as a quote": 2, "quote before a suffix": 1}


def test_load_vocab_is_the_speakable_alphabet(tiny_model_dir):
    _, vocab = speech.load_vocab(tiny_model_dir)
    assert set("abcdefghijklmnopqrstuvwxyzçêîşû '-") == vocab


# --------------------------------------------------------------------------- audio


def test_load_audio_mixes_resamples_and_trims(tmp_path):
    clip = espeak_clip("Roj li pişt çiyayan ava dibe.", 44100, stereo=True)
    silence = np.zeros((44100, 2), dtype=np.float32)
    sf.write(tmp_path / "a.mp3", np.concatenate([silence, clip, silence]), 44100)
    full = speech.load_audio(str(tmp_path / "a.mp3"), 16000)
    trimmed = speech.load_audio(open(tmp_path / "a.mp3", "rb"), 16000, trim=True)
    assert full.dtype == np.float32 and full.ndim == 1 and np.abs(full).max() <= 1.0
    speech_samples = len(clip) * 16000 // 44100
    assert abs(len(full) - (speech_samples + 2 * 16000)) < 2000
    # The added second of silence at each end goes; the clip, quiet edges included, stays.
    assert len(trimmed) <= speech_samples + 2 * 1024
    assert np.sum(trimmed.astype(np.float64) ** 2) > 0.999 * np.sum(full.astype(np.float64) ** 2)


def test_load_audio_mixes_stereo_down_to_the_mean_of_its_channels(tmp_path):
    clip = espeak_clip("Dara sêvê li ber malê ye.", 44100)
    sf.write(tmp_path / "mono.wav", clip, 44100, subtype="FLOAT")
    sf.write(tmp_path / "stereo.wav", np.stack([clip, 0.5 * clip], axis=1), 44100, subtype="FLOAT")
    mono = speech.load_audio(str(tmp_path / "mono.wav"), 16000)
    stereo = speech.load_audio(str(tmp_path / "stereo.wav"), 16000)
    assert stereo.shape == mono.shape and np.allclose(stereo, 0.75 * mono, atol=1e-5)


def test_trim_keeps_speech_that_runs_to_the_edges():
    # A recording cut mid-word, at a length that is no multiple of the trim hop.
    tone = (0.5 * np.sin(np.arange(16000 + 100) * 0.1)).astype(np.float32)
    assert len(speech.trim_silence(tone)) == len(tone)
    padded = np.concatenate([np.zeros(5000, np.float32), tone])
    assert len(tone) <= len(speech.trim_silence(padded)) < len(tone) + 1024
    assert len(speech.trim_silence(np.zeros(8000, np.float32))) == 0


@pytest.mark.parametrize("data, reason", [(b"", "empty_file"), (b"not audio at all\n" * 50, "corrupt_audio")])
def test_load_audio_rejects_unreadable_input(data, reason, tmp_path):
    (tmp_path / "x.mp3").write_bytes(data)
    for source in (str(tmp_path / "x.mp3"), io.BytesIO(data)):
        with pytest.raises(speech.AudioError) as err:
            speech.load_audio(source, 16000)
        assert err.value.reason == reason


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
