"""The listening queue (train_feedback.py --listen N): the pool and what it leaves out, the ranking by rarity,
instability and history with each sentence's reason, the controls, queue.tsv, and the ranked-against-control
figures of sessions marked in headless Chromium."""

import argparse
import csv
import json
import os

import pytest

import train_feedback as tf
from conftest import Served, chromium
from voicetune.common import run_files
from voicetune.feedback import feedback_flags
from voicetune.feedback import listen_queue
from voicetune.feedback import listening
from voicetune.feedback import verdict

# Common sentences: six times each in training (a few held out), so every letter, pair and word of them is common.
COMMON = ["Ez bi kurdî diaxivim.", "Pirtûka min li ser maseyê ye.", "Em ê sibê herin bajêr.",
          "Dayika min nan dipêje.", "Ez îro li mal im.", "Ew zarok di baxçe de dilîzin.",
          "Bavê min mamoste ye.", "Hûn çawa ne?"]
# Sentences with what the training set never holds: q, x, w, ş and numbers.
RARE = ["Qaqib qeşeng e.", "Xwişka xwe xweş dixwaze.", "Ew 1987an hat."]


def data_dir(tmp_path):
    """A training folder whose transcripts are COMMON six times over (a few of them held out)."""
    folder = tmp_path / "training"
    folder.mkdir()
    rows = [f"c{i}_{k}.wav|{text}" for k in range(6) for i, text in enumerate(COMMON)]
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def queue_args(tmp_path, model, pool, count=None, **changes):
    folder = data_dir(tmp_path)
    pool_file = tmp_path / "pool.txt"
    pool_file.write_text("\n".join(pool) + "\n", encoding="utf-8")
    return argparse.Namespace(**dict(dict(model=model, device="cpu", speaker_id=None, data_dir=str(folder),
                                          feedback_dir=str(folder / "feedback"), val_size=100, pool=[str(pool_file)],
                                          listen_count=count or len(pool), asr_model=None, asr_lang=None), **changes))


def ranked_pool(args, monkeypatch):
    """The whole pool ranked (the examples file left out, so the pool is the test's own)."""
    monkeypatch.setattr(listen_queue, "EXAMPLES", args.pool[0])
    voice = listening.load_voice(args)
    rows = listen_queue.build(args, *voice)
    return sorted(rows, key=lambda r: r["rank"]), voice


def test_the_top_of_the_queue_holds_the_rare_and_the_unstable_sentences(tiny_model_dir, tmp_path, monkeypatch):
    args = queue_args(tmp_path, tiny_model_dir, COMMON + RARE)
    rows, _ = ranked_pool(args, monkeypatch)
    assert {r["sentence"] for r in rows} == set(COMMON + RARE)
    common = [r for r in rows if r["sentence"] in COMMON]
    assert all(r["rarity"] == 0 for r in common)
    most_unstable = max(common, key=lambda r: r["instability"])
    # The first of each signal, then the second of each, ...: rarity and instability take turns.
    top = rows[:2 * len(RARE)]
    assert {r["sentence"] for r in top} >= set(RARE) | {most_unstable["sentence"]}
    assert [r["signal"] for r in top] == ["rarity", "instability"] * len(RARE)
    assert rows[1]["sentence"] == most_unstable["sentence"]
    reasons = {r["sentence"]: r["reason"] for r in top}
    assert reasons[most_unstable["sentence"]] == f"unsure durations (spread {most_unstable['instability']:.2f})"
    rare = {r["sentence"]: r["rare"] for r in rows}
    # Rare letters first (the training set never says g, q or ş), then number words, then letter pairs.
    assert rare["Qaqib qeşeng e."][:3] == ["g", "q", "ş"] and rare["Xwişka xwe xweş dixwaze."][0] == "ş"
    assert reasons["Qaqib qeşeng e."] == "rare in the training set: " + ", ".join(rare["Qaqib qeşeng e."][:4])
    assert {"«heştê»", "«heftan»", "«hezar»"} <= set(rare["Ew 1987an hat."])
    assert reasons["Ew 1987an hat."] == "rare in the training set: f, ş, «heftan», «hezar»"


def test_instability_is_the_spread_of_the_predicted_durations(tiny_model_dir, tmp_path):
    args = queue_args(tmp_path, tiny_model_dir, COMMON)
    model, tokenizer, _, _ = listening.load_voice(args)
    ids = listen_queue.speech.token_ids(tokenizer, "ez bi kurdî diaxivim")
    spread = listen_queue.duration_spread(model, ids)
    assert spread > 0.05 and spread == listen_queue.duration_spread(model, ids)  # the same draws every time
    model.noise_scale_duration = 0.0  # no noise: the predictor says one thing
    assert listen_queue.duration_spread(model, ids) == pytest.approx(0.0, abs=1e-6)


def test_the_pool_leaves_out_what_is_recorded_or_marked_good_and_knows_what_needed_work(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    args = queue_args(tmp_path, tiny_model_dir, COMMON + ["Ez bi kurdî diaxivim!", "Ez bi kurdî dixwînim."])
    feedback = tmp_path / "training" / "feedback"
    feedback.mkdir()
    (feedback / "audio_001.wav").write_bytes(b"")
    (feedback / "audio_001.txt").write_text(COMMON[1] + "\n", encoding="utf-8")
    sessions = tmp_path / "training" / run_files.SESSIONS
    for name, voice, rows in [("2026-12-01", tiny_model_dir, [(COMMON[2], "good"), (COMMON[0], "needs_work")]),
                              ("2026-12-02", "other_voice", [(COMMON[3], "good")])]:
        os.makedirs(sessions / name)
        listening.Session(str(sessions / name), str(feedback), voice,
                          [dict(id=f"s{i}", text=t, mark=m, saved=None) for i, (t, m) in enumerate(rows)],
                          16000, None).write()
    rows, _ = ranked_pool(args, monkeypatch)
    pooled = [r["sentence"] for r in rows]
    # Recorded, and marked good for this voice: out; good for another voice: in; a second writing of one: once.
    assert COMMON[1] not in pooled and COMMON[2] not in pooled and COMMON[3] in pooled
    assert pooled.count(COMMON[0]) == 1 and "Ez bi kurdî diaxivim!" not in pooled
    like = next(r for r in rows if r["sentence"] == "Ez bi kurdî dixwînim.")
    assert like["like"] == COMMON[0] and like["history"] > 0.5
    assert listen_queue.reason_words(like, "history") == f"like one marked needs work: {COMMON[0]}"
    again = next(r for r in rows if r["sentence"] == COMMON[0])  # marked needs work, never recorded: offered again
    assert again["history"] == 1.0 and again["rarity"] == 0


def test_a_session_is_four_ranked_to_one_control_and_near_duplicates_are_capped(tiny_model_dir, tmp_path):
    ranked = [dict(sentence=s, rank=i) for i, s in enumerate(
        ["Ez bi kurdî diaxivim.", "Ez bi kurdî diaxivim û dixwînim.", "Ez bi kurdî diaxivim îro."]
        + COMMON[1:] + RARE, 1)]
    rows = listen_queue.choose(ranked, 5, listen_queue.random.Random(0))
    assert [r["role"] for r in rows].count("control") == 1
    chosen = [r["sentence"] for r in rows if r["role"] == "ranked"]
    # The second and third say the first again: skipped for the next ones down.
    assert chosen == ["Ez bi kurdî diaxivim.", COMMON[1], COMMON[2], COMMON[3]]
    control = next(r for r in rows if r["role"] == "control")
    assert control["sentence"] not in chosen and control["rank"] > 3


def write_session(folder, marks):
    """A session of (role, mark) rows with its queue.tsv."""
    rows = [dict(id=f"s{i:03d}", sentence=f"jumle {i}", rank=i, role=role, reason="r", mark=mark)
            for i, (role, mark) in enumerate(marks, 1)]
    os.makedirs(folder)
    listen_queue.write(folder, rows)
    listening.Session(folder, folder, "voice", [dict(id=r["id"], text=r["sentence"], mark=r["mark"], saved=None)
                                               for r in rows], 16000, None).write()


def test_the_queues_worth_is_a_sign_test_over_sessions_once_there_are_enough(tmp_path):
    sessions = tmp_path / "sessions"
    marks = [("ranked", "needs_work"), ("ranked", "good"), ("control", "good")]
    for day in range(verdict.SURE_CLIPS - 1):
        write_session(str(sessions / f"2026-12-0{day + 1}"), marks)
    figures = listen_queue.worth(str(sessions / "2026-12-01"), str(sessions))
    assert [s["ranked"] for s in figures["sessions"]] == [dict(heard=2, needs_work=1, rate=0.5)] * 5
    assert figures["sessions"][0]["control"] == dict(heard=1, needs_work=0, rate=0.0)
    assert figures["sign_test"] is None
    assert figures["line"] == ("needs work: ranked 5 of 10 (50%), control 0 of 5 (0%); a sign test after 1 more "
                               "session with both marked")
    write_session(str(sessions / "2026-12-09"), [("ranked", "good"), ("control", "needs_work"), ("ranked", None)])
    figures = listen_queue.worth(str(sessions / "2026-12-09"), str(sessions))
    assert figures["sign_test"] == dict(sessions=6, ranked_higher=5, ranked_lower=1,
                                        p_value=verdict.sign_test(5, 1))
    assert figures["pooled"]["control"] == dict(heard=6, needs_work=1, rate=1 / 6)
    assert figures["line"].endswith(f"lower: 1 (two-sided sign test p = {verdict.sign_test(5, 1):.3g})")


def test_listen_with_no_session_starts_a_queue_and_pool_needs_a_number(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["--model", tiny_model_dir, "--device", "cpu"]
    args = tf.parse_args(["--listen"] + base)
    assert (args.listen, args.listen_count) == (str(feedback_flags.QUEUE_SIZE), feedback_flags.QUEUE_SIZE)
    assert os.path.dirname(args.output_dir) == os.path.join("training", "sessions")
    assert tf.parse_args(["--listen", "7"] + base).listen_count == 7
    for argv, error in [(["--pool", "x.txt"], "--pool goes with --listen N"),
                        (["--listen", "0"], "--listen 0: a session needs at least 1 sentence"),
                        (["--listen", "5", "--pool", "x.txt"], "--pool: no sentence file at x.txt")]:
        with pytest.raises(SystemExit):
            tf.parse_args(argv + base)
        assert error in capsys.readouterr().err


def test_a_queued_session_marked_in_chromium_shows_ranked_and_control_rates(tiny_model_dir, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    args = queue_args(tmp_path, tiny_model_dir, COMMON + RARE)
    monkeypatch.setattr(listen_queue, "EXAMPLES", args.pool[0])
    folder = str(tmp_path / "training" / run_files.SESSIONS / "2026-12-10")
    served = Served(["--listen", "5", "--model", tiny_model_dir, "--data_dir", args.data_dir, "--pool", args.pool[0],
                     "--output_dir", folder, "--port", "0", "--device", "cpu"], monkeypatch)
    with open(os.path.join(folder, run_files.QUEUE), encoding="utf-8", newline="") as f:
        queued = list(csv.DictReader(f, delimiter="\t"))
    assert list(queued[0]) == list(listen_queue.COLUMNS)
    assert [q["role"] for q in queued].count("control") == 1 and len(queued) == 5
    ranked = sorted(int(q["rank"]) for q in queued if q["role"] == "ranked")
    assert ranked == [1, 2, 3, 4]
    session = json.loads(served.request("GET", "/api/session")[1])
    assert [r["reason"] for r in session["rows"]] == [q["reason"] for q in queued]
    # The control needs work, and one ranked sentence of four.
    marks = ["needs_work" if q["role"] == "control" else "good" for q in queued]
    marks[next(i for i, q in enumerate(queued) if q["role"] == "ranked")] = "needs_work"
    browser = chromium(tmp_path)
    try:
        browser.get(f"http://127.0.0.1:{served.port}/")
        wait = WebDriverWait(browser, 60)
        for i, mark in enumerate(marks):
            row = wait.until(lambda b: b.find_element(By.ID, f"row-{i}"))
            assert row.find_element(By.CSS_SELECTOR, ".reason").text == f"why it is here: {queued[i]['reason']}"
            if i == len(marks) - 1:
                assert browser.find_element(By.ID, "queue-rows").text == ""  # hidden until every one is heard
            row.find_element(By.CSS_SELECTOR, ".good" if mark == "good" else ".needs-work").click()
            wait.until(lambda b: b.find_element(By.ID, "progress").text.startswith(f"{i + 1} of 5 heard"))
        line = "needs work: ranked 1 of 4 (25%), control 1 of 1 (100%); a sign test after 5 more sessions with both marked"
        wait.until(lambda b: b.find_element(By.ID, "queue-line").text == line)
        assert browser.find_element(By.ID, "queue-rows").text == "2026-12-10 1 of 4 (25%) 1 of 1 (100%)"
    finally:
        browser.quit()
    served.stop()
    report = run_files.read_report(folder)["queue"]
    assert report["sessions"] == [dict(session="2026-12-10", ranked=dict(heard=4, needs_work=1, rate=0.25),
                                       control=dict(heard=1, needs_work=1, rate=1.0))]
    assert report["line"] == line
