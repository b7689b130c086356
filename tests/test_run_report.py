"""report.html: the page of a tiny night and of a feedback run, rendered in headless Chromium: every player
plays its file, the curves are the metrics, the best epoch is marked, nothing is fetched from outside."""

import json
import os
import sys
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from voicetune.common import run_files
from voicetune.feedback import blind_compare
from voicetune.feedback import verdict
from voicetune.night import run_report
from conftest import chromium, screenshot

PY = run_files.interpreter()  # what the next-step commands start with (test_run_files pins the rule)

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
# Every violation of the page's Content-Security-Policy, recorded from before the page's first byte.
WATCH_VIOLATIONS = ("window.violations = [];"
                    "document.addEventListener('securitypolicyviolation', (e) => window.violations.push(e.blockedURI));")
# Each player loads its file whole; its src, readyState, duration and error code once it can play (or fails).
LOAD_PLAYERS = """
const done = arguments[arguments.length - 1];
Promise.all([...document.querySelectorAll("audio")].map((a) => new Promise((resolve) => {
  const report = () => resolve([a.getAttribute("src"), a.readyState, a.duration, a.error && a.error.code]);
  a.oncanplaythrough = report;
  a.onerror = report;
  a.preload = "auto";
  a.load();
}))).then(done);
"""
# Each chart: its title, the best-epoch line's epoch, and its points (epoch, value, cy).
READ_CHARTS = """
return [...document.querySelectorAll("svg.chart")].map((svg) => [
  svg.getAttribute("aria-label"),
  svg.querySelector("line.best") ? svg.querySelector("line.best").textContent : null,
  [...svg.querySelectorAll("circle")].map((c) => [+c.dataset.epoch, +c.dataset.value, +c.getAttribute("cy"),
                                                   c.getAttribute("fill")])]);
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium"), network_log=True)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_VIOLATIONS})
    yield driver
    driver.quit()


def render(browser, folder, png=None):
    """Open FOLDER/report.html from disk: (players, charts, the page's text, every URL requested, violations);
    with `png`, a full-page screenshot to it (into docs/ with DOCS_SCREENSHOTS=1)."""
    browser.get_log("performance")  # drop what an earlier page asked for
    browser.get("file://" + os.path.abspath(os.path.join(folder, run_files.PAGE)))
    players = browser.execute_async_script(LOAD_PLAYERS)
    charts = browser.execute_script(READ_CHARTS)
    text = browser.find_element("tag name", "body").text
    requested = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    requested = [m["params"]["request"]["url"] for m in requested if m["method"] == "Network.requestWillBeSent"]
    violations = browser.execute_script("return window.violations")
    if png:
        screenshot(browser, png)
    return players, charts, text, requested, violations


def as_a_user_sees_it(browser, folder, home, run, png, args, monkeypatch, model=None):
    """The page of a copy of the run `folder` at HOME/RUN, built from HOME as the working folder, as a user
    who ran the command there with the default paths sees it: HOME is their checkout of the repository with
    its .venv, RUN names the run, and the paths the run recorded of what lies outside it (run_config.json's
    `args`; report.json's `model`) are that user's. A full-page screenshot to `png` (the one in docs/ with
    DOCS_SCREENSHOTS=1); the page's text."""
    monkeypatch.setattr(run_files, "REPOSITORY", home)
    monkeypatch.setattr(sys, "executable", os.path.join(home, ".venv", "bin", "python"))
    copy = os.path.join(home, run)
    shutil.copytree(folder, copy)
    config = run_files.read_run_config(copy)
    config["args"].update(args)
    run_files.write_run_config(copy, config)
    if model:
        run_files.write_report(copy, dict(run_files.read_report(copy), model=model))
    os.chdir(home)
    run_report.write(run)
    return render(browser, copy, png)[2]


def check_offline_and_playable(folder, players, requested, violations):
    """Every player is a relative path to a file of the run folder that soundfile decodes and Chromium
    plays to its full length; nothing was requested from anywhere but that folder."""
    assert players
    root = "file://" + os.path.abspath(folder) + "/"
    for src, ready, duration, error in players:
        assert not re.match(r"[a-z]+:|/", src), src  # relative: the folder can be moved or copied
        info = sf.info(os.path.join(folder, *src.split("/")))
        assert error is None and ready == 4, (src, ready, error)  # HAVE_ENOUGH_DATA
        assert duration == pytest.approx(info.duration, abs=0.002), src
    # Chromium's own media controls draw data: icons; everything else is the page and the run's files.
    outside = [u for u in requested if not u.startswith(root) and not u.startswith("data:")]
    assert not outside and violations == []
    assert root + run_files.PAGE in requested
    assert {root + src for src, *_ in players} <= set(requested)


def validation_lines(folder):
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "lr" not in r]


def check_charts(charts, lines, sets, prefixes, best, before=None):
    """The curves are the metrics, line by line, one line per validation set (a feedback run's input voice
    first, as epoch 0); higher values drawn higher; the best epoch marked on each. sets: the metrics' mel
    prefixes; prefixes: their voice-quality ones."""
    assert len(charts) == 4  # mel, MCD, duration ratio, DNSMOS (no CER without --asr_model)
    measures = ("mel", "mcd", "dur_ratio", "dnsmos_ovrl")
    for (title, marked, points), measure, keys in zip(charts, measures, [[f"{s}_mel" for s in sets]] + [
            [f"{p}_{measure}" for p in prefixes] for measure in measures[1:]]):
        expected = [([(0, before[s][measure])] if before else []) + [(r["epoch"], r[key]) for r in lines]
                    for s, key in zip(sets, keys)]
        assert [(e, v) for e, v, _, _ in points] == sum(expected, []), title
        assert len({colour for *_, colour in points}) == len(keys)
        assert marked == f"best epoch {best}"
        assert all(a[2] < b[2] for a in points for b in points if a[1] > b[1]), title


def test_the_report_of_a_night(browser, night_run, tmp_path, monkeypatch):
    folder, pages = night_run
    # Written at the start, after each epoch and at the end, as progress.json stood each time.
    assert [(p["epoch"], p["ended"]) for p in pages] == [(0, None), (1, None), (2, None), (2, "done")]
    players, charts, text, requested, violations = render(browser, folder)
    check_offline_and_playable(folder, players, requested, violations)
    assert sorted(src for src, *_ in players) == [f"samples/epoch_{e}/0{i}.wav" for e in (1, 2) for i in (0, 1)]

    lines = validation_lines(folder)
    best = min(lines, key=lambda r: r["val_mel"])["epoch"]  # --best_metric val_mel: the lowest, first on ties
    check_charts(charts, lines, ["val"], ["eval"], best)
    progress = pages[-1]
    assert f"finished its plan at step {progress['step']}" in text
    assert f"{progress['plan']['total_steps']} steps = 2 epochs of 3, batch 2 × 2, steps as asked" in text
    assert f"Best epoch\n{best} (by val_mel" in text or f"Best epoch {best} (by val_mel" in text
    final = os.path.join(folder, "final_model")
    assert os.path.isfile(os.path.join(os.path.dirname(DOCS), run_files.SENTENCES))  # the file that ships
    # (night_run trained on prepared_dataset, a folder other than the default: every hint names it)
    data_dir = run_files.read_run_config(folder)["args"]["data_dir"]
    assert f"{PY} train_feedback.py --listen {run_files.SENTENCES} --model {final} --data_dir {data_dir}" in text
    assert f"{PY} train_feedback.py --model {final} --data_dir {data_dir}" in text

    monkeypatch.chdir(tmp_path)  # (as_a_user_sees_it moves into its home)
    shown = as_a_user_sees_it(browser, folder, str(tmp_path / "home"), "training", str(tmp_path / "report_night.png"),
                              dict(model="facebook/mms-tts-kmr-script_latin", data_dir="training"), monkeypatch)
    assert "Voice trained from facebook/mms-tts-kmr-script_latin" in shown
    final = os.path.join("training", "final_model")
    assert f".venv/bin/python train_feedback.py --listen {run_files.SENTENCES} --model {final}\n" in shown
    assert str(tmp_path) not in shown and os.path.dirname(folder) not in shown


def test_the_report_of_a_feedback_run(browser, feedback_run, tmp_path, monkeypatch):
    home, folder = feedback_run
    players, charts, text, requested, violations = render(browser, folder)
    check_offline_and_playable(folder, players, requested, violations)
    with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    held_out = report["feedback"]["held_out_clips"]
    assert len(held_out) == 1
    # Per feedback sentence: the recording, the input voice, the tuned voice; per evaluation sentence: both voices.
    expected = {f"samples/{where}/{name}" for name in report["samples"]["feedback"]
                for where in ("recorded", "before/feedback", "after/feedback")}
    expected |= {f"samples/{when}/eval/{name}" for name in report["samples"]["eval"] for when in ("before", "after")}
    expected |= {"samples/epoch_1/00.wav", "samples/epoch_1/01.wav"}
    assert {src for src, *_ in players} == expected
    for name, sentence in report["samples"]["feedback"].items():
        assert f"{sentence} {'held out' if name in held_out else 'trained on'}" in text

    lines = validation_lines(folder)
    best = min(lines, key=lambda r: r["feedback_mel"])["epoch"]
    check_charts(charts, lines, ["feedback", "original"], ["feedback_eval", "original_eval"], best, report["before"])
    with open(os.path.join(folder, "run_config.json"), encoding="utf-8") as f:
        data_dir = json.load(f)["args"]["data_dir"]
    assert f"{PY} train_feedback.py --compare {folder} --data_dir {data_dir}" in text
    assert f"{PY} train_feedback.py --promote {folder} --data_dir {data_dir}" in text
    # The verdict, who decided it and every reason.
    verdict = report["verdict"]
    assert f"Verdict: {verdict['decision']}" in text and f"decided by the {verdict['decided_by']}" in text
    assert all(reason in text for reason in verdict["reasons"])
    for row in report["validation_mel"].values():
        assert run_report.number(row["after"]) in text

    monkeypatch.chdir(tmp_path)  # (as_a_user_sees_it moves into its home)
    voice, run = os.path.join("training", "final_model"), os.path.join("training", "feedback_models", "20261205-070000")
    shown = as_a_user_sees_it(browser, folder, str(tmp_path / "home"), run, str(tmp_path / "report_feedback.png"),
                              dict(model=voice, data_dir="training"), monkeypatch, model=voice)
    assert f"Input voice {voice}" in shown
    assert f".venv/bin/python train_feedback.py --compare {run}\n" in shown
    assert f".venv/bin/python train_feedback.py --promote {run}\n" in shown  # the default --data_dir: not spelled out
    assert str(tmp_path) not in shown and home not in shown and os.path.dirname(report["model"]) not in shown


def test_a_page_that_cannot_be_written_never_stops_the_run(tmp_path, monkeypatch, capsys):
    def broken(folder):
        raise KeyError("plan")
    monkeypatch.setattr(run_report, "build", broken)
    run_report.update(str(tmp_path))
    assert "report.html not written (KeyError: 'plan')" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []  # no half-written page, no temp file left


def test_first_best_and_latest_epochs_side_by_side_for_every_speaker(tmp_path):
    # A multi-speaker night of three epochs whose best (lowest val_mel) is the middle one.
    folder = tmp_path / "run"
    for epoch in (1, 2, 3):
        for speaker in (0, 4):
            (folder / "samples" / f"epoch_{epoch}" / f"speaker_{speaker}").mkdir(parents=True)
            for i in (0, 1):
                sf.write(folder / "samples" / f"epoch_{epoch}" / f"speaker_{speaker}" / f"0{i}.wav",
                         np.zeros(1600), 16000)
    with open(folder / "metrics.jsonl", "w", encoding="utf-8") as f:
        for epoch, mel in ((1, 3.0), (2, 2.5), (3, 2.7)):
            f.write(json.dumps(dict(step=10 * epoch, epoch=epoch, mel=9.0, lr=1e-4)) + "\n")  # a training line
            f.write(json.dumps(dict(step=10 * epoch, epoch=epoch, val_mel=mel)) + "\n")
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("Roj baş.\nEz baş im.\n", encoding="utf-8")
    (folder / "run_config.json").write_text(json.dumps(dict(script="train_vits", args=dict(
        sample_sentences=str(sentences), best_metric="val_mel"))), encoding="utf-8")
    page = open(run_report.write(str(folder)), encoding="utf-8").read()
    for speaker in (0, 4):
        section = page.split(f"<h3>speaker {speaker}</h3>")[1].split("</table>")[0]
        assert "<th>first (epoch 1)</th><th>best (epoch 2)</th><th>latest (epoch 3)</th>" in section
        for i, text in enumerate(["Roj baş.", "Ez baş im."]):
            assert re.search(rf"<td>{text}</td>" + "".join(
                rf'<td><audio controls preload="none" src="samples/epoch_{e}/speaker_{speaker}/0{i}.wav"></audio></td>'
                for e in (1, 2, 3)), section), (speaker, i)
    assert "Best epoch</th><td>2 (by val_mel" in page


def feedback_page(folder, decision, reasons):
    """report.html of a finished feedback run (only what the page reads of it) whose verdict is `decision`."""
    folder.mkdir()
    (folder / "run_config.json").write_text(json.dumps(dict(script="train_feedback", args=dict(
        data_dir="training"))), encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(dict(status="done", model="training/voice", verdict=dict(
        decision=decision, decided_by="guards", reasons=reasons, guards={}))), encoding="utf-8")
    with open(run_report.write(str(folder)), encoding="utf-8") as f:
        return f.read()


def test_the_verdicts_reasons_are_shown_as_text_never_as_markup(tmp_path):
    # A reason quotes what a user wrote (a file name, a sentence): it may hold anything.
    reason = 'reject: audio_<b>1</b>.wav & "Roj" <script>alert(1)</script>: the voice got worse'
    page = feedback_page(tmp_path / "run", "reject", [reason])
    assert ('<li>reject: audio_&lt;b&gt;1&lt;/b&gt;.wav &amp; &quot;Roj&quot; &lt;script&gt;alert(1)&lt;/script&gt;: '
            "the voice got worse</li>") in page
    assert "<b>1</b>" not in page and "<script>alert" not in page


def test_a_rejected_runs_promote_command_says_it_is_refused_unless_forced(tmp_path):
    said = ("<li>Put the tuned voice to use; the voice it replaces is kept for --rollback{}"
            '<div class="command"><code>' + PY + ' train_feedback.py --promote {}</code>')
    for decision in ("reject", "keep"):
        folder = tmp_path / decision
        page = feedback_page(folder, decision, [f"{decision}: held-out feedback mel 2.000 -> 1.800"])
        refused = " (the verdict is reject: refused unless --force)"
        assert said.format(refused if decision == "reject" else "", folder) in page, decision
        if decision == "keep":
            assert "refused unless --force" not in page


def mel_chart_points(page):
    """(epoch, value) of each point of the page's validation mel chart."""
    chart = next(svg for svg in page.split('<svg class="chart"')[1:] if 'aria-label="Validation mel loss' in svg)
    return [(int(e), float(v)) for e, v in re.findall(r'data-epoch="(\d+)" data-value="([^"]+)"', chart)]


def test_the_curves_leave_out_the_training_lines(tmp_path):
    # The training lines as the loop logs them: every logging step, with the losses of the step and its lr.
    def training_line(step, epoch):
        return dict(step=step, epoch=epoch, g=30.0, adv=2.5, fm=1.0, mel=9.0 + step, kl=1.5, dur=1.2, lr=2e-4,
                    samples_per_s=3.0, skipped_steps=0, oom_splits=0)

    folder = tmp_path / "run"
    folder.mkdir()
    metrics = folder / "metrics.jsonl"
    metrics.write_text(json.dumps(training_line(1, 1)) + "\n", encoding="utf-8")
    with open(run_report.write(str(folder)), encoding="utf-8") as f:
        page = f.read()
    assert "No epoch has been validated yet." in page and '<svg class="chart"' not in page
    lines = [training_line(2, 1), dict(step=3, epoch=1, val_mel=2.5), training_line(4, 2),
             dict(step=6, epoch=2, val_mel=2.25),
             # Killed after epoch 2's validation, before its checkpoint: the resumed run trains epoch 2 again
             # and logs its training lines after that validation; then epoch 3 is under way.
             training_line(5, 2), training_line(7, 3)]
    with open(metrics, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    with open(run_report.write(str(folder)), encoding="utf-8") as f:
        page = f.read()
    assert mel_chart_points(page) == [(1, 2.5), (2, 2.25)]
    assert "Best epoch</th><td>2 (by val_mel" in page


def judged_page(folder, preferred):
    """report.html of a feedback run every guard passed, then compared blind: pairs of every kind, the voice
    `preferred` ("input" or "tuned") chosen in six of them (a sure preference, p = 0.031), no difference heard
    in the seventh."""
    report = dict(status="done", model="training/voice",
                  validation_mel=dict(feedback=dict(before=2.0, after=1.8, change=-0.2),
                                      original=dict(before=1.5, after=1.5123, change=0.0123)),
                  before=dict(feedback=dict(per_clip=dict(mel=[2.0])), original=dict(per_clip=dict(mel=[1.5]))),
                  after=dict(feedback=dict(per_clip=dict(mel=[1.8])), original=dict(per_clip=dict(mel=[1.5123]))))
    pairs = [dict(text=f"Hevok {i}.", kind=kind, tuned="A", choice=choice) for i, (kind, choice) in enumerate(
        zip(["held_out", "needs_work", "good"] + ["eval"] * 4, ["A" if preferred == "tuned" else "B"] * 6 + ["same"]))]
    report["listening"] = blind_compare.listening_result(pairs)
    report["verdict"] = verdict.decide(report, listening=report["listening"])
    folder.mkdir()
    (folder / "run_config.json").write_text(json.dumps(dict(script="train_feedback", args=dict(data_dir="training"))),
                                            encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")
    with open(run_report.write(str(folder)), encoding="utf-8") as f:
        return f.read()


def test_a_verdict_of_the_listeners_is_a_row_of_its_guard_table_and_every_code_is_said_in_words(tmp_path):
    guards = ("<thead><tr><th>Guard</th><th>Result</th></tr></thead><tbody><tr><td>held-out feedback mel</td>"
              "<td>pass</td></tr><tr><td>held-out original mel</td><td>pass</td></tr>"
              "<tr><td>listeners (blind comparison)</td><td>{}</td></tr></tbody>")
    # The input voice preferred: a reject above a table of passes says who rejected it.
    page = judged_page(tmp_path / "rejected", "input")
    assert '<h2>Verdict: <span class="decision reject">reject</span></h2>' in page
    assert guards.format("fail (decides the verdict)") in page
    row = "<tr><td>validation mel</td><td>held-out {}</td><td>{}</td><td>{}</td><td>{}</td></tr>"
    assert row.format("feedback", "2", "1.8", "-10.0 %") in page
    assert row.format("original", "1.5", "1.512", "+0.8 %") in page
    assert [run_report.change(*pair) for pair in ((1.5, 1.49999), (1.5, 1.5), (0.0, 1.0), (1.0, float("nan")))] == \
        ["0.0 %", "0.0 %", "–", "–"]
    for kind, preferred in (("held-out feedback", "input voice"), ("marked needs work", "input voice"),
                            ("marked good", "input voice"), ("evaluation sentence", "no difference")):
        assert f"<td>{kind}</td><td>{preferred}</td></tr>" in page
    assert not {"held_out", "needs_work", "original_mel", "unjudged"} & set(re.findall(r"[a-z_]+", page))
    # The tune preferred: the guards decide, the listeners' row a pass.
    page = judged_page(tmp_path / "kept", "tuned")
    assert '<h2>Verdict: <span class="decision keep">keep</span></h2>' in page
    assert guards.format("pass") in page
    assert "<td>held-out feedback</td><td>tuned voice</td></tr>" in page


def test_a_guard_that_could_not_judge_says_so_in_words(tmp_path):
    folder = tmp_path / "run"
    feedback_page(folder, "reject", ["reject: cannot judge the held-out feedback mel: 0 held-out clips"])
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    report["verdict"]["guards"] = dict(feedback=dict(measure="held-out feedback mel", status="unjudged"))
    (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")
    with open(run_report.write(str(folder)), encoding="utf-8") as f:
        assert "<tr><td>held-out feedback mel</td><td>cannot judge</td></tr>" in f.read()
