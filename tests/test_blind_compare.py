"""train_feedback.py --compare: a blind A/B of the tuned voice against its input voice, clicked through in
headless Chromium to its result in report.json, with everything the page received checked for the key."""

import hashlib
import http.client
import io
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import soundfile as sf
from scipy.stats import binomtest

from voicetune.common import page_server
from voicetune.common import run_files
from voicetune.feedback import blind_compare
from voicetune.feedback import listening
from conftest import FEEDBACK_TEXTS, chromium, raw_request, screenshot, Served
from examples.make_release import SENTENCES


@pytest.fixture
def compare_run(feedback_run, tmp_path, monkeypatch):
    """(home, a copy of the feedback run): served from `home`, where training/sessions holds its session."""
    home, run = feedback_run
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    monkeypatch.chdir(home)
    return home, copy


@pytest.fixture
def serve(monkeypatch):
    """serve(argv): train_feedback.main(argv) serving in a thread, stopped at the end of the test whatever happens."""
    started = []

    def start(argv):
        started.append(Served(argv, monkeypatch))
        return started[-1]
    yield start
    for served in started:
        if served.thread.is_alive():
            served.server.shutdown()
            served.thread.join()


@pytest.fixture
def answers(monkeypatch):
    """Every answer the comparison's server sends, as (request line, raw bytes on the wire), in order."""
    sent = []
    setup, finish = blind_compare.Handler.setup, blind_compare.Handler.finish

    def recording_setup(handler):
        setup(handler)
        handler.wire, socket_file = [], handler.wfile

        class Tee:
            def write(self, data):
                handler.wire.append(bytes(data))
                return socket_file.write(data)

            def __getattr__(self, name):
                return getattr(socket_file, name)
        handler.wfile = Tee()

    def recording_finish(handler):
        sent.append((getattr(handler, "requestline", ""), b"".join(handler.wire)))
        finish(handler)
    monkeypatch.setattr(blind_compare.Handler, "setup", recording_setup)
    monkeypatch.setattr(blind_compare.Handler, "finish", recording_finish)
    return sent


def split_answer(raw):
    """(status, headers without Date, body) of a raw HTTP answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = sorted(line for line in lines[1:] if not line.startswith("Date:"))
    return int(lines[0].split()[1]), headers, body


def read_key(run):
    with open(os.path.join(run, blind_compare.FOLDER, blind_compare.STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def expected_sentences(home, run):
    """(kind, text) of every sentence the comparison should hold, from the run's report and its session."""
    with open(os.path.join(run, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    held_out = [report["samples"]["feedback"][clip] for clip in report["feedback"]["held_out_clips"]]
    wanted = [("held_out", t) for t in held_out] + [("good", SENTENCES[5])]
    if FEEDBACK_TEXTS[1].rstrip(".").lower() not in held_out:  # (a held-out clip also marked is heard once)
        wanted.append(("needs_work", FEEDBACK_TEXTS[1]))
    return sorted(wanted + [("eval", t) for t in report["samples"]["eval"].values()]), report


def test_the_result_counts_preferences_and_its_p_value_is_the_exact_binomial_tail():
    def judged(tuned_wins, input_wins, ties):
        pairs = [dict(text="t", kind="eval", tuned="A", choice="A")] * tuned_wins
        pairs += [dict(text="t", kind="good", tuned="B", choice="A")] * input_wins
        return blind_compare.listening_result(pairs + [dict(text="t", kind="eval", tuned="A", choice="same")] * ties)

    result = judged(1, 9, 3)
    assert {k: result[k] for k in ("pairs", "tuned_preferred", "input_preferred", "no_difference")} == dict(
        pairs=13, tuned_preferred=1, input_preferred=9, no_difference=3)
    assert [s["preferred"] for s in result["per_sentence"]] == ["tuned"] + ["input"] * 9 + ["none"] * 3
    # Closed forms, ties left out: all n one way: 2 / 2**n; 1 of 10: 2 * (1 + 10) / 2**10; an even split: 1.
    assert result["p_value"] == 2 * (1 + 10) / 1024
    assert judged(0, 5, 2)["p_value"] == 2 / 32 and judged(6, 0, 0)["p_value"] == 2 / 64
    assert judged(4, 4, 1)["p_value"] == 1.0 and judged(0, 0, 3)["p_value"] == 1.0
    for wins in range(0, 13):
        for losses in range(0, 13):
            if wins + losses:
                assert judged(wins, losses, 0)["p_value"] == pytest.approx(
                    binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-12), (wins, losses)


def on_disk(comparison, index, letter):
    """The take written as `letter` of pair `index` (each listener hears them under letters of their own draw)."""
    return os.path.join(comparison.folder, "audio", f"{index:03d}{letter}.wav")


def test_which_side_is_the_tuned_voice_is_drawn_for_every_pair(tmp_path):
    """Half the pairs have the tuned voice as A (the odd one either way), and which half is drawn anew: no
    position in the listening order, and no sentence, always has it on the same side."""
    for n in (6, 7):
        # Take i: the input voice a constant -0.25, the tuned voice +0.5, of lengths that differ by sentence.
        takes = [("eval", f"sentence {i}", np.full(200 + 10 * i, -0.25, np.float32),
                  np.full(150 + 10 * i, 0.5, np.float32), 16000) for i in range(n)]
        by_position, by_sentence, tuned_as_a = {}, {}, set()
        for seed in range(40):
            run = tmp_path / f"run_{n}_{seed}"
            comparison = blind_compare.make_comparison(str(run), takes, random.Random(seed))
            assert sorted(p["text"] for p in comparison.pairs) == sorted(t[1] for t in takes)
            tuned_as_a.add(sum(p["tuned"] == "A" for p in comparison.pairs))
            for i, pair in enumerate(comparison.pairs):
                by_position.setdefault(i, set()).add(pair["tuned"])
                by_sentence.setdefault(pair["text"], set()).add(pair["tuned"])
                # The key is true: the tuned voice's take is the file served as its letter, both padded alike.
                a, _ = sf.read(on_disk(comparison, i, "A"), dtype="float32")
                b, _ = sf.read(on_disk(comparison, i, "B"), dtype="float32")
                assert len(a) == len(b)
                tuned, given = (a, b) if pair["tuned"] == "A" else (b, a)
                assert tuned[0] == 0.5 and given[0] == -0.25
            assert read_key(str(run))["pairs"] == comparison.pairs
        assert tuned_as_a == {n // 2, (n + 1) // 2}, n
        assert all(sides == {"A", "B"} for sides in by_position.values()), (n, by_position)
        assert all(sides == {"A", "B"} for sides in by_sentence.values()), (n, by_sentence)


def test_a_sentence_held_out_and_marked_in_the_session_is_compared_once(tiny_model_dir, tmp_path):
    held_out_text, eval_text = "sibê ez ê biçim bazarê", "ez baş im"
    feedback = tmp_path / "training" / "feedback"
    feedback.mkdir(parents=True)
    run = tmp_path / "training" / "feedback_models" / "run"
    shutil.copytree(tiny_model_dir, run / "final_model")
    for where, name, seconds in (("feedback", "audio_002.wav", 0.5), ("eval", "00.wav", 0.3)):
        for when, level in (("before", -0.25), ("after", 0.5)):
            (run / "samples" / when / where).mkdir(parents=True, exist_ok=True)
            sf.write(run / "samples" / when / where / name, np.full(int(16000 * seconds), level), 16000,
                     subtype="PCM_16")
    (run / "report.json").write_text(json.dumps(dict(
        status="done", model=tiny_model_dir, speaker_id=None,
        samples=dict(feedback={"audio_002.wav": held_out_text}, eval={"00.wav": eval_text}),
        feedback=dict(dir=str(feedback), held_out_clips=["audio_002.wav"]))), encoding="utf-8")
    # The session that recorded the corrections marked the held-out sentence needs work, and one more good.
    sessions = tmp_path / "training" / "sessions"
    (sessions / "2026-12-05").mkdir(parents=True)
    rows = [dict(id="s001", text="Sibê ez ê biçim bazarê.", mark="needs_work", saved=str(feedback / "audio_002.wav")),
            dict(id="s002", text="Roj baş.", mark="good", saved=None)]
    listening.Session(str(sessions / "2026-12-05"), str(feedback), tiny_model_dir, rows, 16000, None, 2).write()

    comparison = blind_compare.open_comparison(str(run), "cpu", str(sessions), random.Random(0))
    assert sorted((p["kind"], p["text"]) for p in comparison.pairs) == [
        ("eval", eval_text), ("good", "Roj baş."), ("held_out", held_out_text)]
    # The held-out sentence is heard as the run spoke it (its own samples), not spoken again.
    i = next(i for i, p in enumerate(comparison.pairs) if p["kind"] == "held_out")
    tuned, _ = sf.read(on_disk(comparison, i, comparison.pairs[i]["tuned"]), dtype="float32")
    assert len(tuned) == 8000 and tuned[0] == 0.5


def start_listener(browser, port, name=""):
    """Open the page in `browser`, start as a new listener called `name`; wait for the first pair."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"http://127.0.0.1:{port}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "start").is_displayed())
    others = browser.find_element(By.ID, "continue").text
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "begin").click()
    wait.until(lambda b: b.find_element(By.ID, "pair").get_attribute("data-index") == "0")
    return others


def listener_key(run, name):
    """(the pairs as `name` hears them: each with the letter of the tuned voice for them, their id)."""
    saved = read_key(run)
    one = next(one for one in saved["listeners"] if one["name"] == name)
    return [dict(p, tuned=t) for p, t in zip(saved["pairs"], one["tuned"])], one["id"]


def judge(browser, key, choices, first=0):
    """Click `choices` for the pairs from `first` on, checking each pair's text and that both takes play."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    for index, choice in enumerate(choices, first):
        wait.until(lambda b: b.find_element(By.ID, "pair").get_attribute("data-index") == str(index))
        assert browser.find_element(By.ID, "text").text == key[index]["text"]
        # Both players can play their takes (loaded as the page loads them, A first).
        loaded = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            Promise.all(["A", "B"].map((l) => new Promise((resolve) => {
              const a = document.getElementById("audio-" + l);
              const report = () => resolve([a.readyState, a.duration, a.error && a.error.code]);
              if (a.readyState === 4) report(); else { a.oncanplaythrough = report; a.onerror = report; }
            }))).then(done);""")
        durations = {d for _, d, _ in loaded}
        assert [(r, e) for r, _, e in loaded] == [(4, None), (4, None)] and len(durations) == 1
        browser.find_element(By.ID, f"choose-{choice}").click()


def shown_result(browser):
    """(summary, pooled line, verdict line, key rows) of a listener's result on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "result").is_displayed())
    return (browser.find_element(By.ID, "summary").text, browser.find_element(By.ID, "pooled").text,
            browser.find_element(By.ID, "verdict").text,
            [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#key tr")])


def input_preferred(key):
    """No difference heard in the first pair, the input voice preferred in every other."""
    return ["same"] + ["B" if p["tuned"] == "A" else "A" for p in key[1:]]


def check_blind(answers, run, finals):
    """Everything sent to a listener before the answer to their last choice says nothing of which voice is
    which; `finals` {listener id: index of that answer}. Returns {listener id: {audio path: answer}}."""
    page = page_server.served_page(blind_compare.PAGE)
    audio = {}
    for i, (line, raw) in enumerate(answers):
        status, headers, body = split_answer(raw)
        path = line.split()[1]
        if path == "/":
            assert body == page  # the same page whatever the key
            continue
        owner = next((who for who in finals if who in path), None)
        if path == "/api/listeners":
            owner = json.loads(body)["listener"]
        if owner is not None and i >= finals[owner]:
            assert not path.startswith("/audio/")  # a finished listener's page plays nothing more
            result = json.loads(body)["result"]
            assert set(result["pooled"]) == {"pairs", "tuned_preferred", "input_preferred", "no_difference",
                                             "p_value", "listeners"}  # counts: no other listener's key
            continue
        for secret in (b"tuned", b"input", b"before", b"after", b"compare", b"final_model", b".wav", b"samples",
                       os.path.basename(run).encode(), os.path.dirname(run).encode()):
            assert secret not in raw.lower(), (line, secret)
        if path.startswith("/audio/"):
            audio.setdefault(owner, {})[path] = (status, headers, body)
        elif path == "/api/state":
            state = json.loads(body)
            assert set(state) == {"total", "listeners"}
            assert all(set(one) == {"name", "judged", "done", "listener"} for one in state["listeners"])
            assert all(one["listener"] is None for one in state["listeners"] if one["done"])
        elif path.startswith("/api/"):
            state = json.loads(body)
            assert set(state) == {"listener", "name", "pairs", "judged", "total", "done", "result"}
            assert state["listener"] == owner and state["done"] is False and state["result"] is None
            assert all(set(p) == {"index", "text", "choice"} for p in state["pairs"])
    return audio


def check_served_takes(audio, listener, key, report, run):
    """Both takes of each pair went out alike, and the letter the key names for this listener is the tuned
    voice's take: the run's own "after" sample, for the evaluation sentences."""
    assert {p.rsplit("/", 1)[0] for p in audio} == {f"/audio/{listener}/{i}" for i in range(len(key))}
    for i, pair in enumerate(key):
        a, b = audio[f"/audio/{listener}/{i}/A"], audio[f"/audio/{listener}/{i}/B"]
        assert a[0] == b[0] == 200 and a[1] == b[1]  # the same headers, Content-Length included
        assert len(a[2]) == len(b[2]) and a[2][:44] == b[2][:44]  # one length, one WAV header
        if pair["kind"] == "eval":
            name = next(k for k, t in report["samples"]["eval"].items() if t == pair["text"])
            after, _ = sf.read(os.path.join(run, "samples", "after", "eval", name), dtype="int16")
            served_tuned, _ = sf.read(io.BytesIO((a if pair["tuned"] == "A" else b)[2]), dtype="int16")
            np.testing.assert_array_equal(served_tuned[:len(after)], after)
            assert not served_tuned[len(after):].any()  # padded with silence


def test_a_comparison_clicked_through_in_chromium_stays_blind_to_its_end(compare_run, answers, serve, tmp_path):
    home, run = compare_run
    wanted, report = expected_sentences(home, run)
    served = serve(["--compare", run, "--port", "0", "--device", "cpu"])
    assert sorted((p["kind"], p["text"]) for p in read_key(run)["pairs"]) == wanted
    browser = chromium(tmp_path)
    try:
        start_listener(browser, served.port)
        key, listener = listener_key(run, "listener 1")  # the test may know it; the page must not
        n = len(key)
        # Half the pairs have the tuned voice as A (the odd one either way).
        assert sum(p["tuned"] == "A" for p in key) in (n // 2, (n + 1) // 2)
        # The listener prefers the input voice everywhere but in the first pair, where they hear no difference.
        choices = input_preferred(key)
        judge(browser, key, choices)
        summary, _, verdict_line, shown_key = shown_result(browser)
        screenshot(browser, str(tmp_path / "compare_page.png"))
    finally:
        browser.quit()
    served.stop()

    # The result: report.json, the page, report.html.
    p_value = 2 * math.comb(n - 1, 0) / 2 ** (n - 1)
    with open(os.path.join(run, "report.json"), encoding="utf-8") as f:
        listened = json.load(f)["listening"]
    assert {k: listened[k] for k in ("pairs", "tuned_preferred", "input_preferred", "no_difference")} == dict(
        pairs=n, tuned_preferred=0, input_preferred=n - 1, no_difference=1)
    assert listened["p_value"] == pytest.approx(p_value, rel=1e-12)
    assert [(s["listener"], s["text"], s["kind"], s["tuned_was"], s["choice"], s["preferred"])
            for s in listened["per_sentence"]] == [
        ("listener 1", p["text"], p["kind"], p["tuned"], c, "none" if c == "same" else "input")
        for p, c in zip(key, choices)]
    assert f"The tuned voice was preferred in 0 of {n} sentences, the voice before the tune in {n - 1}" in summary
    assert shown_key == [f"{p['text']} {p['tuned']} " + ("no difference –" if c == "same" else f"{c} input voice")
                         for p, c in zip(key, choices)]
    with open(os.path.join(run, run_files.PAGE), encoding="utf-8") as f:
        page = f.read()
    assert f"tuned voice preferred in 0, the input voice in {n - 1}, no difference in 1" in page
    # One listener's n - 1 pairs cannot be sure: the verdict is decided again, and the guards' decision stands.
    assert p_value >= 0.05
    with open(os.path.join(run, "report.json"), encoding="utf-8") as f:
        decided = json.load(f)["verdict"]
    assert (decided["decision"], decided["decided_by"]) == (report["verdict"]["decision"], "guards")
    assert f"listeners preferred the tune in 0 of {n} pairs, the input voice in {n - 1} (1 no difference; " \
           f"p={p_value:.2g}; 1 listener): no sure preference, no decision by the listeners: the guards decide" \
           in decided["reasons"][-1]
    decision = report["verdict"]["decision"]
    assert f"Verdict: {decision} (decided by guards)" in verdict_line
    assert f'class="decision {decision}">{decision}</span>' in page and "decided by the guards" in page

    # Blind: everything sent before the last choice's answer, which alone reveals the key.
    final = [i for i, (line, raw) in enumerate(answers) if line.startswith("POST /api/choose/") and b'"done": true' in raw]
    assert len(final) == 1 and b'"tuned_was"' in answers[final[0]][1]
    audio = check_blind(answers, run, {listener: final[0]})
    check_served_takes(audio[listener], listener, key, report, run)


def test_two_listeners_judge_one_comparison_each_blind_to_their_own_end_and_pooled(compare_run, answers, serve,
                                                                                   tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    home, run = compare_run
    with open(os.path.join(run, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    guards_said = report["verdict"]["decision"]
    served = serve(["--compare", run, "--port", "0", "--device", "cpu"])
    ava, bo = chromium(tmp_path / "ava"), chromium(tmp_path / "bo")
    try:
        # Ava judges every pair but the last, preferring the input voice in every one.
        start_listener(ava, served.port, "Ava")
        ava_key, ava_id = listener_key(run, "Ava")
        n = len(ava_key)
        ava_choices = ["B" if p["tuned"] == "A" else "A" for p in ava_key]
        judge(ava, ava_key, ava_choices[:-1])
        # Bo, in another browser, is offered to continue as Ava, starts as himself, and judges every pair,
        # preferring the input voice (no difference in the first).
        offered = start_listener(bo, served.port, "Bo")
        assert offered == f"continue as Ava ({n - 1} of {n} judged)"
        bo_key, bo_id = listener_key(run, "Bo")
        assert sum(p["tuned"] == "A" for p in bo_key) in (n // 2, (n + 1) // 2)
        assert [c for c in read_key(run)["listeners"][0]["choices"]] == ava_choices[:-1] + [None]
        bo_choices = input_preferred(bo_key)
        judge(bo, bo_key, bo_choices)
        bo_summary, bo_pooled, bo_verdict, bo_shown = shown_result(bo)
        # Another listener at Bo's browser is offered a fresh start, or Ava's place; not Bo's, who is done.
        bo.find_element(By.ID, "another").click()
        WebDriverWait(bo, 30).until(lambda b: b.find_element(By.ID, "start").is_displayed())
        assert bo.find_element(By.ID, "others").text == "Finished so far: Bo."
        assert bo.find_element(By.ID, "continue").text == f"continue as Ava ({n - 1} of {n} judged)"
        with open(os.path.join(run, "report.json"), encoding="utf-8") as f:
            after_bo = json.load(f)
        # Bo's end: his key on his page alone; Ava, reopening hers, is back at her last pair, the key unseen.
        ava.refresh()
        judge(ava, ava_key, ava_choices[-1:], first=n - 1)
        ava_summary, ava_pooled, ava_verdict, ava_shown = shown_result(ava)
    finally:
        ava.quit()
        bo.quit()
    served.stop()

    assert bo_shown == [f"{p['text']} {p['tuned']} " + ("no difference –" if c == "same" else f"{c} input voice")
                        for p, c in zip(bo_key, bo_choices)]
    assert ava_shown == [f"{p['text']} {p['tuned']} {c} input voice" for p, c in zip(ava_key, ava_choices)]
    assert f"The tuned voice was preferred in 0 of {n} sentences, the voice before the tune in {n - 1}" in bo_summary
    assert f"The tuned voice was preferred in 0 of {n} sentences, the voice before the tune in {n}," in ava_summary
    # Bo alone cannot be sure: no decision by the listeners, the guards' decision stands.
    p_bo, p_both = 2 / 2 ** (n - 1), 2 / 2 ** (2 * n - 1)
    assert p_bo >= 0.05 > p_both
    assert after_bo["listening"]["pairs"] == n and [one["name"] for one in after_bo["listening"]["listeners"]] == ["Bo"]
    assert (after_bo["verdict"]["decision"], after_bo["verdict"]["decided_by"]) == (guards_said, "guards")
    assert bo_pooled == (f"Everyone who finished, pooled (1 listener: Bo): the tuned voice preferred in 0 of {n} "
                         f"judgements, the voice before the tune in {n - 1}, no difference in 1 (p = {p_bo:.3g}).")
    assert f"Verdict: {guards_said} (decided by guards)" in bo_verdict
    # Both pooled: 2n - 1 of 2n against the tune is sure, and the listeners reject it.
    with open(os.path.join(run, "report.json"), encoding="utf-8") as f:
        final = json.load(f)
    listened = final["listening"]
    assert {k: listened[k] for k in ("pairs", "tuned_preferred", "input_preferred", "no_difference")} == \
        dict(pairs=2 * n, tuned_preferred=0, input_preferred=2 * n - 1, no_difference=1)
    assert listened["p_value"] == pytest.approx(p_both, rel=1e-12)
    assert [{k: one[k] for k in ("name", "pairs", "tuned_preferred", "input_preferred", "no_difference")}
            for one in listened["listeners"]] == [  # in the order they started
        dict(name="Ava", pairs=n, tuned_preferred=0, input_preferred=n, no_difference=0),
        dict(name="Bo", pairs=n, tuned_preferred=0, input_preferred=n - 1, no_difference=1)]
    assert [(s["listener"], s["tuned_was"], s["choice"]) for s in listened["per_sentence"]] == \
        [("Ava", p["tuned"], c) for p, c in zip(ava_key, ava_choices)] + \
        [("Bo", p["tuned"], c) for p, c in zip(bo_key, bo_choices)]
    assert (final["verdict"]["decision"], final["verdict"]["decided_by"]) == ("reject", "listeners")
    assert final["verdict"]["reasons"][0] == (
        f"reject: listeners preferred the tune in 0 of {2 * n} pairs, the input voice in {2 * n - 1} (1 no "
        f"difference; p={p_both:.2g}; 2 listeners): they surely preferred the input voice")
    assert ava_pooled == (f"Everyone who finished, pooled (2 listeners: Ava, Bo): the tuned voice preferred in 0 of "
                          f"{2 * n} judgements, the voice before the tune in {2 * n - 1}, no difference in 1 "
                          f"(p = {p_both:.3g}).")
    assert "Verdict: reject (decided by listeners)" in ava_verdict

    # Blind: each listener's page got nothing telling which voice is which before their own last choice.
    finals = {who: next(i for i, (line, raw) in enumerate(answers)
                        if line.startswith(f"POST /api/choose/{who}/") and b'"done": true' in raw)
              for who in (ava_id, bo_id)}
    assert finals[bo_id] < finals[ava_id]
    audio = check_blind(answers, run, finals)
    check_served_takes(audio[ava_id], ava_id, ava_key, report, run)
    check_served_takes(audio[bo_id], bo_id, bo_key, report, run)


def tree(folder):
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if response.getheader("Content-Type") == "application/json" else data


def test_every_choice_is_saved_at_once_reopening_continues_and_bad_requests_are_refused(compare_run, serve, capsys):
    home, run = compare_run
    outside = {f: h for f, h in tree(os.path.dirname(run)).items() if not f.startswith("run" + os.sep)}
    outside_home = tree(home)
    served = serve(["--compare", run, "--port", "0", "--device", "cpu"])
    port = served.port
    status, state = request(port, "POST", "/api/listeners", b'{"name": "  Ava\\u0007 "}')
    assert status == 200 and state["name"] == "Ava" and state["judged"] == 0 and state["done"] is False
    who = state["listener"]
    assert read_key(run)["listeners"][0]["id"] == who  # on disk before the answer came back
    status, state = request(port, "POST", f"/api/choose/{who}/1", b'{"choice": "same"}')
    assert status == 200 and state["judged"] == 1 and state["pairs"][1]["choice"] == "same"
    assert read_key(run)["listeners"][0]["choices"][1] == "same"  # on disk before the answer came back
    n = state["total"]
    audio = {letter: request(port, "GET", f"/audio/{who}/0/{letter}")[1] for letter in "AB"}
    # A second listener: their own choices, none of Ava's; Ava's state unchanged by them.
    status, other = request(port, "POST", "/api/listeners", b"{}")
    assert status == 200 and other["name"] == "listener 2" and other["judged"] == 0 and other["listener"] != who
    assert request(port, "POST", f"/api/choose/{other['listener']}/0", b'{"choice": "A"}')[1]["judged"] == 1
    assert [p["choice"] for p in request(port, "GET", f"/api/listener/{who}")[1]["pairs"]][:2] == [None, "same"]
    assert request(port, "GET", "/api/state")[1] == dict(total=n, listeners=[
        dict(name="Ava", judged=1, done=False, listener=who),
        dict(name="listener 2", judged=1, done=False, listener=other["listener"])])

    host = ("Host", f"127.0.0.1:{port}")
    nobody = "0" * 16
    for method, path, headers, body, expected in [
            ("POST", f"/api/choose/{who}/0", [("Content-Length", "20")], b'{"choice": "tuned"}\n', 400),
            ("POST", f"/api/choose/{who}/0", [("Content-Length", "6")], b'"same"', 400),
            ("POST", f"/api/choose/{who}/0", [("Content-Length", "40")], b"[" * 40, 400),
            ("POST", f"/api/choose/{who}/0", [], b"", 411),
            ("POST", f"/api/choose/{who}/0", [("Content-Length", "99999")], b"", 413),
            ("POST", f"/api/choose/{who}/{n}", [("Content-Length", "17")], b'{"choice": "A"}\n\n', 404),
            ("POST", f"/api/choose/{who}/" + "9" * 5000, [("Content-Length", "0")], b"", 404),
            ("POST", f"/api/choose/{nobody}/0", [("Content-Length", "15")], b'{"choice": "A"}', 404),
            ("POST", "/api/choose/0", [("Content-Length", "15")], b'{"choice": "A"}', 404),
            ("POST", "/api/listeners", [("Content-Length", "78")], b'{"name": "' + b"x" * 66 + b'"}', 400),
            ("POST", "/api/listeners", [("Content-Length", "4")], b'"Bo"', 400),
            ("GET", f"/api/listener/{nobody}", [], b"", 404), ("GET", "/api/listener/0", [], b"", 404),
            ("GET", f"/audio/{who}/0/C", [], b"", 404), ("GET", f"/audio/{who}/{n}/A", [], b"", 404),
            ("GET", f"/audio/{nobody}/0/A", [], b"", 404), ("GET", "/audio/0/A", [], b"", 404),
            ("GET", "/audio/0/../../report.json", [], b"", 404), ("GET", "/compare/comparison.json", [], b"", 404),
            ("GET", f"/api/choose/{who}/0", [], b"", 405), ("POST", "/api/state", [("Content-Length", "0")], b"", 405),
            ("GET", "/api/listeners", [], b"", 405),
            ("POST", f"/audio/{who}/0/A", [("Content-Length", "0")], b"", 405), ("PUT", "/", [], b"", 405)]:
        status, _, answer = raw_request(port, method, path, [host] + headers, body)
        assert status == expected and answer["error"], (method, path[:30], status, answer)
    assert len(read_key(run)["listeners"]) == 2  # no refused start made a listener
    # Another site's page, or a rebound domain name, gets nothing and changes nothing.
    assert raw_request(port, "POST", f"/api/choose/{who}/0", [host, ("Origin", "http://evil.example"),
                                                               ("Content-Length", "15")], b'{"choice": "A"}')[0] == 403
    assert raw_request(port, "POST", "/api/listeners", [host, ("Origin", "http://evil.example"),
                                                        ("Content-Length", "2")], b"{}")[0] == 403
    assert raw_request(port, "GET", f"/audio/{who}/0/A", [("Host", "evil.example")])[0] == 403
    served.stop()

    # Reopened: the same pairs, listeners, keys and takes, the choices kept; nothing is spoken again.
    assert read_key(run)["listeners"][0]["choices"][0] is None and len(read_key(run)["listeners"]) == 2
    resumed = serve(["--compare", run, "--port", "0", "--device", "cpu"])
    status, state = request(resumed.port, "GET", f"/api/listener/{who}")
    assert state["judged"] == 1 and state["pairs"][1]["choice"] == "same" and state["done"] is False
    assert {letter: request(resumed.port, "GET", f"/audio/{who}/0/{letter}")[1] for letter in "AB"} == audio
    for i in [0] + list(range(2, n)):
        status, state = request(resumed.port, "POST", f"/api/choose/{who}/{i}", b'{"choice": "A"}')
    assert state["done"] is True and state["result"]["pairs"] == n
    # Once her key is out, none of her choices changes; the other listener goes on, blind.
    status, answer = request(resumed.port, "POST", f"/api/choose/{who}/0", b'{"choice": "B"}')
    assert status == 409 and read_key(run)["listeners"][0]["choices"][0] == "A"
    status, state = request(resumed.port, "POST", f"/api/choose/{other['listener']}/1", b'{"choice": "B"}')
    assert status == 200 and state["judged"] == 2 and state["result"] is None
    assert request(resumed.port, "GET", "/api/state")[1]["listeners"][0] == dict(name="Ava", judged=n, done=True,
                                                                                 listener=None)
    resumed.stop()
    data_dir = run_files.read_run_config(run)["args"]["data_dir"]  # (the run's own record names it)
    assert f"continue with: {run_files.compare_command(run, data_dir)}\n" in capsys.readouterr().out

    # Nothing was written anywhere but the run folder.
    assert {f: h for f, h in tree(os.path.dirname(run)).items() if not f.startswith("run" + os.sep)} == outside
    assert tree(home) == outside_home


def test_a_comparison_of_one_listener_from_before_continues_as_listener_1(compare_run, serve):
    _, run = compare_run
    serve(["--compare", run, "--port", "0", "--device", "cpu"]).stop()  # the pairs and their takes, made
    saved = read_key(run)
    assert saved["listeners"] == []
    # comparison.json as it was written with one listener: the key and the choice in each pair.
    old = dict(created_for=saved["created_for"], finished=None,
               pairs=[dict(p, choice="same" if i == 2 else None) for i, p in enumerate(saved["pairs"])])
    with open(os.path.join(run, blind_compare.FOLDER, blind_compare.STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(old, f)
    resumed = serve(["--compare", run, "--port", "0", "--device", "cpu"])
    overview = request(resumed.port, "GET", "/api/state")[1]
    assert [(one["name"], one["judged"], one["done"]) for one in overview["listeners"]] == [("listener 1", 1, False)]
    who = overview["listeners"][0]["listener"]
    assert [p["choice"] for p in request(resumed.port, "GET", f"/api/listener/{who}")[1]["pairs"]][1:3] == \
        [None, "same"]
    # The letters they heard are the letters they hear: the files' own.
    for letter in "AB":
        with open(os.path.join(run, blind_compare.FOLDER, "audio", f"002{letter}.wav"), "rb") as f:
            assert request(resumed.port, "GET", f"/audio/{who}/2/{letter}")[1] == f.read()
    assert read_key(run)["listeners"][0]["tuned"] == [p["tuned"] for p in saved["pairs"]]
    resumed.stop()


def test_listeners_draw_balanced_letters_of_their_own_and_are_at_most_a_hundred(tmp_path):
    pairs = [dict(text=f"t{i}", kind="eval", tuned="A") for i in range(7)]
    (tmp_path / blind_compare.FOLDER).mkdir()
    comparison = blind_compare.Comparison(str(tmp_path), pairs)
    drawn = [comparison.add_listener(f"L{i}")["listener"] for i in range(blind_compare.MAX_LISTENERS)]
    letters = [comparison.listener(who)["tuned"] for who in drawn]
    assert all(sum(t == "A" for t in one) in (3, 4) for one in letters)  # half, the odd one either way
    assert len({tuple(one) for one in letters}) > 1 and len(set(drawn)) == len(drawn)  # each their own
    with pytest.raises(page_server.UploadError) as refused:
        comparison.add_listener("one more")
    assert refused.value.status == 409 and len(read_key(str(tmp_path))["listeners"]) == blind_compare.MAX_LISTENERS


def test_compare_refuses_a_run_that_has_not_finished(feedback_run, tmp_path, capsys):
    import train_feedback

    _, run = feedback_run
    copy = shutil.copytree(run, tmp_path / "run")
    report = json.loads((copy / "report.json").read_text(encoding="utf-8"))
    (copy / "report.json").write_text(json.dumps(dict(report, status="training")), encoding="utf-8")
    assert train_feedback.main(["--compare", str(copy), "--port", "0"]) != 0
    assert "no finished feedback run there" in capsys.readouterr().err
    assert not os.path.exists(copy / blind_compare.FOLDER)
