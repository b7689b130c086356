"""Which rows prepare_data.py takes and which text of each: --text_column X wins over a `sentence` or `text`
column beside it (Common Voice TSV and Hugging Face dataset alike), and an empty vote field counts as 0
votes for --min_upvotes / --max_downvotes."""

import csv
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare_data
import speech

WRONG = "Ev ne ew hevok e."  # a speakable text that is not what the clips say


def release_rows(release, n):
    return prepare_data.read_tsv(os.path.join(release, "validated.tsv"))[1][:n]


def prepared_texts(prepared_dataset, rows):
    """What the release's own `sentence` of these rows became in the prepared folder: the reference."""
    texts = dict(speech.read_metadata(os.path.join(prepared_dataset, "metadata.csv")))
    return [(row["path"].replace(".mp3", ".wav"), texts[row["path"].replace(".mp3", ".wav")]) for row in rows]


def prepare(input_path, model, out, *flags):
    report = prepare_data.main(["--input", str(input_path), "--model", model, "--output_dir", str(out),
                                "--workers", "1", *flags])
    return report, speech.read_metadata(os.path.join(out, "metadata.csv"))


def test_text_column_and_empty_votes_in_a_common_voice_tsv(kmr_release, prepared_dataset, tiny_model_dir, tmp_path):
    rows = release_rows(kmr_release, 3)
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
    report, metadata = prepare(folder, tiny_model_dir, tmp_path / "out", "--text_column", "kurmanji",
                               "--max_downvotes", "0")
    assert metadata == prepared_texts(prepared_dataset, rows[:2])
    assert report["not_selected"] == {"too_many_downvotes": 1}
    # A column the TSV does not have is one line, not the `sentence` column instead.
    with pytest.raises(SystemExit) as err:
        prepare(folder, tiny_model_dir, tmp_path / "out2", "--text_column", "kurmanj")
    assert "--text_column kurmanj" in str(err.value) and "\n" not in str(err.value)


def test_text_column_and_empty_votes_in_a_hugging_face_dataset(kmr_release, prepared_dataset, tiny_model_dir,
                                                               tmp_path):
    rows = release_rows(kmr_release, 3)
    audio = pa.array([{"bytes": open(os.path.join(kmr_release, "clips", row["path"]), "rb").read(),
                       "path": row["path"]} for row in rows],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"audio": audio, "sentence": [WRONG] * 3, "text": [WRONG] * 3,
                      "kurmanji": [row["sentence"] for row in rows],
                      "up_votes": pa.array([None, 2, 0], pa.int64()), "down_votes": pa.array([None, 0, 3], pa.int64())})
    os.makedirs(tmp_path / "dataset" / "data")
    pq.write_table(table, tmp_path / "dataset" / "data" / "train-00000-of-00001.parquet")
    report, metadata = prepare(tmp_path / "dataset", tiny_model_dir, tmp_path / "out", "--text_column", "kurmanji",
                               "--max_downvotes", "0")
    assert [text for _, text in metadata] == [text for _, text in prepared_texts(prepared_dataset, rows[:2])]
    assert report["not_selected"] == {"too_many_downvotes": 1}


def test_an_empty_vote_field_counts_as_no_votes():
    rows = [dict(up_votes="", down_votes=""), dict(up_votes="2", down_votes="1"), dict(up_votes=" ", down_votes=" "),
            dict(up_votes="x", down_votes="x")]  # the last is no number: never selected by a vote filter
    assert prepare_data.select_by_votes(rows, 1, None) == ([rows[1]], {"too_few_upvotes": 3})
    assert prepare_data.select_by_votes(rows, 0, None) == (rows[:3], {"too_few_upvotes": 1})
    assert prepare_data.select_by_votes(rows, None, 0) == ([rows[0], rows[2]], {"too_many_downvotes": 2})
    assert prepare_data.select_by_votes(rows, None, None) == (rows, {})
