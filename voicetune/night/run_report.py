"""report.html: the page a run folder opens with in the morning. One self-contained file built from what the
run left in its folder (metrics.jsonl, run_config.json, progress.json, report.json, samples/): the curves of
every validation measure with the best epoch marked, the plan and how the run ended, the listening samples
as players, a feedback run's before/after, its verdict and listening result, and what to run next.

Self-contained: the charts are inline SVG drawn here (no plotting library at run time), the style and the
one small script are inline, and a Content-Security-Policy lets the page load nothing but the run's own
audio files, which the players name by relative path. The page is rewritten (atomically) after every epoch
and at the end of a run, and again when a blind comparison (blind_compare.py) adds its result.
"""

import html
import math
import os
import time
from urllib.parse import quote

from voicetune.common import run_files
from voicetune.common import run_folder
from voicetune.voice import voice_quality

# Nothing but this folder's audio: no script, style, font or image from anywhere, no request by a script.
CSP = "default-src 'none'; media-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
COLORS = ("#1f6fb4", "#d0452f", "#2a9a3a", "#8a56b8")
# (title, measure, a reference value) of each chart; a set's measure is <set>_mel or <quality prefix>_<measure>
# in metrics.jsonl, and <measure> in a feedback report's "before" (drawn as epoch 0, "before").
MEASURES = (
    ("Validation mel loss (lower is better)", "mel", None),
    ("MCD-DTW, dB (lower is better)", "mcd", None),
    ("Duration ratio, spoken / recorded (1 is right)", "dur_ratio", 1.0),
    ("DNSMOS OVRL (higher is better)", "dnsmos_ovrl", None),
)
SET_NAMES = {"val": "validation clips", "feedback": "held-out feedback", "original": "held-out original"}
GUARD_RESULTS = {"pass": "pass", "fail": "fail", "unjudged": "cannot judge"}
PREFERRED = {"tuned": "tuned voice", "input": "input voice", "none": "no difference"}
ENDINGS = {"done": "finished its plan", "deadline": "stopped at the deadline (the budget was spent)",
           "max_steps": "stopped at --max_steps", "interrupted": "was interrupted (Ctrl-C or a signal)"}


# ----------------------------------------------------------------------------------------------------
# progress.json: the plan and where the run stands, written by the training loop (rank 0).

def record_progress(output_dir, args, plan, epoch, step, hours_used, ended=None):
    """Write progress.json (the plan, the last finished epoch, the step, the budget, how the run ended),
    then the page. Either failing is one printed line: the run goes on without them."""
    progress = dict(plan=plan, epoch=epoch, step=step, hours_used=hours_used, budget_hours=args.target_hours,
                    batch_size=args.batch_size, grad_accum=args.grad_accum, ended=ended,
                    updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        run_files.write_progress(output_dir, progress)
    except OSError as err:
        print(f"warning: {os.path.join(output_dir, run_files.PROGRESS)} not written ({err})")
    update(output_dir)


def update(output_dir):
    """Rewrite OUTPUT_DIR/report.html; a failure is one printed line (the run goes on without its page)."""
    try:
        write(output_dir)
    except Exception as err:  # noqa: BLE001 - the page is a view: nothing about it may lose a night
        print(f"warning: {os.path.join(output_dir, run_files.PAGE)} not written ({type(err).__name__}: {err})")


def write(output_dir):
    path = os.path.join(output_dir, run_files.PAGE)
    run_folder.write_atomically(path, build(output_dir), durable=False)
    return path


# ----------------------------------------------------------------------------------------------------
# Reading the run folder (its files are read by run_files).

def best_epoch(records, sets, metric):
    """The epoch whose checkpoints/best_model the loop kept: the first lowest selection score."""
    scores = []
    for epoch, record in records.items():
        try:
            score = voice_quality.selection_score(record, sets[0], metric)
        except (KeyError, IndexError, TypeError):
            continue
        if isinstance(score, (int, float)) and math.isfinite(score):
            scores.append((score, epoch))
    return min(scores)[1] if scores else None


def sample_sentences(config):
    """The listening sentences of the run (--sample_sentences, else the defaults); None if the file is gone."""
    try:
        return voice_quality.read_sentences((config or {}).get("args", {}).get("sample_sentences"))
    except Exception:  # noqa: BLE001 - a moved or emptied sentence file only costs the labels
        return None


def epoch_sample_dirs(output_dir):
    """{epoch: samples/epoch_N} of every epoch that left listening samples."""
    folder = os.path.join(output_dir, run_files.SAMPLES)
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if run_files.epoch_of(name) is not None:
            found[run_files.epoch_of(name)] = f"{run_files.SAMPLES}/{name}"
    return dict(sorted(found.items()))


# ----------------------------------------------------------------------------------------------------
# Drawing: inline SVG line charts and audio players.

def finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def number(value):
    if not finite(value):
        return "–"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def change(before, after):
    """How far `after` moved from `before`, in percent of it with its sign: "+3.2 %", "-0.1 %"; "0.0 %" for a
    change that rounds to none."""
    if not (finite(before) and finite(after)) or before == 0:
        return "–"
    percent = round(100 * (after / before - 1), 1)
    return f"{percent:+.1f} %" if percent else "0.0 %"


def words(names, code):
    """A code of report.json (a guard's status, a sentence's kind) as the page says it: its name in `names`,
    else the code itself; escaped."""
    return html.escape(str(names.get(code, code) if isinstance(code, str) else code))


def line_chart(title, series, best=None, reference=None, width=440, height=210):
    """An SVG chart of values per epoch: one line per (name, {epoch: value}) series, the best epoch as a
    dashed vertical line, `reference` as a dotted horizontal one. Empty string when there is nothing to draw."""
    points = [(e, v) for _, values in series for e, v in values.items()
              if isinstance(v, (int, float)) and math.isfinite(v)]
    if not points:
        return ""
    left, right, top, bottom = 58, 12, 28, 34
    epochs = [e for e, _ in points]
    e0, e1 = min(epochs), max(epochs)
    values = [v for _, v in points] + ([reference] if reference is not None else [])
    v0, v1 = min(values), max(values)
    pad = (v1 - v0) * 0.08 or abs(v1) * 0.05 or 1.0
    v0, v1 = v0 - pad, v1 + pad

    def x(e):
        return left + (width - left - right) * ((e - e0) / (e1 - e0) if e1 > e0 else 0.5)

    def y(v):
        return top + (height - top - bottom) * (v1 - v) / (v1 - v0)

    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{left}" y="16" class="title">{html.escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" class="frame"/>']
    for v in (v0 + pad, v1 - pad):
        out.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" class="tick" text-anchor="end">{number(v)}</text>')
    for e in sorted({e0, e1} | ({best} if best is not None and e0 <= best <= e1 else set())):
        out.append(f'<text x="{x(e):.1f}" y="{height - bottom + 14}" class="tick" text-anchor="middle">'
                   f'{e or "before"}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" class="tick" '
               'text-anchor="middle">epoch</text>')
    if reference is not None:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(reference):.1f}" y2="{y(reference):.1f}" '
                   'class="reference"/>')
    if best is not None and e0 <= best <= e1:
        out.append(f'<line x1="{x(best):.1f}" x2="{x(best):.1f}" y1="{top}" y2="{height - bottom}" class="best">'
                   f'<title>best epoch {best}</title></line>')
    for i, (name, values) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        kept = [(e, v) for e, v in sorted(values.items()) if isinstance(v, (int, float)) and math.isfinite(v)]
        if len(kept) > 1:
            path = " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in kept)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for e, v in kept:
            out.append(f'<circle cx="{x(e):.1f}" cy="{y(v):.1f}" r="3" fill="{color}" data-epoch="{e}" '
                       f'data-value="{v!r}"><title>{html.escape(name)}, epoch {e}: {number(v)}</title></circle>')
        if len(series) > 1:
            out.append(f'<text x="{width - right - 4}" y="{top + 14 + 13 * i}" class="legend" fill="{color}" '
                       f'text-anchor="end">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def player(output_dir, relative):
    """An <audio> player of RELATIVE (a path inside the run folder, / separated), or a dash when it is missing."""
    if not os.path.isfile(os.path.join(output_dir, *relative.split("/"))):
        return '<span class="missing">–</span>'
    return f'<audio controls preload="none" src="{html.escape(quote(relative))}"></audio>'


def table(header, rows, cls=""):
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ----------------------------------------------------------------------------------------------------
# The page's sections.

def build(output_dir):
    config = run_files.read_run_config(output_dir) or {}
    progress = run_files.read_progress(output_dir)
    report = run_files.read_report(output_dir)
    records = run_files.validation_records(output_dir)
    sets = run_files.validated_sets(records)
    args = config.get("args", {})
    best = best_epoch(records, sets, args.get("best_metric", "val_mel"))
    feedback = config.get("script") == "train_feedback" or report is not None
    title = f"{'Feedback run' if feedback else 'Training run'} {os.path.basename(os.path.abspath(output_dir))}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        summary(output_dir, config, progress, report, best),
        verdict_section(report) if report else "",
        listening_section(report) if report else "",
        next_steps(output_dir, config, progress, report),
        charts(records, sets, best, (report or {}).get("before")),
        before_after_tables(report) if report else "",
        feedback_players(output_dir, report) if report else "",
        epoch_players(output_dir, config, best),
        f'<p class="small">Written {time.strftime("%Y-%m-%d %H:%M:%S")} from {html.escape(output_dir)}; '
        "rewritten after every epoch and at the end of the run.</p>",
    ]
    return PAGE.replace("{title}", html.escape(title)).replace("{csp}", CSP).replace(
        "{body}", "\n".join(s for s in sections if s))


def summary(output_dir, config, progress, report, best):
    args = config.get("args", {})
    facts = []
    if report and report.get("model"):
        facts.append(("Input voice", html.escape(str(report["model"]))))
    elif args.get("model"):
        facts.append(("Voice trained from", html.escape(str(args["model"]))))
    if config.get("started"):
        facts.append(("Started", html.escape(config["started"])))
    facts.append(("Status", html.escape(run_state(output_dir, progress, report))))
    if progress:
        plan = progress.get("plan") or {}
        budget = progress.get("budget_hours")
        per_s = plan.get("samples_per_s")
        facts.append(("Plan", html.escape(
            f"{plan.get('total_steps')} steps = {plan.get('epochs')} epoch{'s' * (plan.get('epochs') != 1)} of "
            f"{plan.get('steps_per_epoch')}, "
            f"batch {progress.get('batch_size')} × {progress.get('grad_accum')}"
            + (f", {per_s:.2f} samples/s measured" if isinstance(per_s, (int, float)) else ", steps as asked")
            + (f", budget {budget * 60:.0f} min" if isinstance(budget, (int, float)) and budget < 1 else
               f", budget {budget:.2f} h" if isinstance(budget, (int, float)) else ""))))
    if config.get("device"):
        facts.append(("Machine", html.escape(f"{config['device']}, {config.get('precision')}, "
                                             f"{config.get('processes', 1)} process(es)")))
    if best is not None:
        facts.append(("Best epoch", f"{best} (by {html.escape(args.get('best_metric', 'val_mel'))}; "
                                    "kept in checkpoints/best_model)"))
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def run_state(output_dir, progress, report):
    """How the run stands, in words."""
    if progress is None:
        return "starting (no plan yet)"
    step, epoch, plan = progress.get("step"), progress.get("epoch"), progress.get("plan") or {}
    used = progress.get("hours_used") or 0.0
    if progress.get("ended") is None:
        return (f"training: epoch {epoch} of {plan.get('epochs')} done, step {step} of {plan.get('total_steps')}, "
                f"{used * 60:.0f} min used (as of {progress.get('updated')})")
    ended = ENDINGS.get(progress["ended"], progress["ended"])
    text = f"{ended} at step {step}, after {used * 60:.1f} min"
    if report and report.get("status") != "done" and progress["ended"] != "interrupted":
        text += "; the tuned voice's samples and report are being made"
    elif os.path.isdir(os.path.join(output_dir, run_files.FINAL_MODEL)) and progress["ended"] != "interrupted":
        text += "; the voice is in final_model/"
    return text


def charts(records, sets, best, before=None):
    """A chart per measure, a line per validation set; `before`: a feedback run's figures of its input voice."""
    if not records:
        return "<h2>Curves</h2><p>No epoch has been validated yet.</p>"
    drawn = []
    for title, measure, reference in MEASURES:
        series = [(SET_NAMES.get(s, s), {**({0: (before.get(s) or {}).get(measure)} if before else {}),
                                        **{e: r.get(run_files.metric_key(s, measure)) for e, r in records.items()}})
                  for s in sets]
        drawn.append(line_chart(title, series, best, reference))
    drawn.append(line_chart("ASR character error rate (lower is better)",
                            [("listening sentences", {e: r.get("asr_cer") for e, r in records.items()})], best))
    marked = f" The dashed line marks the best epoch ({best})." if best is not None else ""
    if before:
        marked += " The first point is the input voice, before the tune."
    return (f"<h2>Curves</h2><p>Measured on held-out clips after every epoch.{marked}</p>"
            f'<div class="charts">{"".join(drawn)}</div>')


def epoch_players(output_dir, config, best):
    """The listening sentences as the first, best and latest epochs spoke them."""
    found = epoch_sample_dirs(output_dir)
    if not found:
        return ""
    first, latest = min(found), max(found)
    chosen = [("first", first)] + ([("best", best)] if best in found and best not in (first, latest) else []) + \
             ([("latest", latest)] if latest != first else [])
    sentences = sample_sentences(config)
    latest_dir = os.path.join(output_dir, *found[latest].split("/"))
    groups = {}  # "" or "speaker_K/" (a multi-speaker voice speaks in a folder per speaker): its WAVs
    for root, _, files in os.walk(latest_dir):
        sub = os.path.relpath(root, latest_dir).replace(os.sep, "/")
        if any(f.endswith(".wav") for f in files):
            groups["" if sub == "." else sub + "/"] = sorted(f for f in files if f.endswith(".wav"))
    blocks = []
    for sub, names in sorted(groups.items()):
        rows = []
        for name in names:
            i = run_files.sentence_index(name)
            said = sentences and i is not None and i < len(sentences)
            text = sentences[i] if said else f"sentence {name[:-4]}"
            rows.append([html.escape(text)] + [player(output_dir, f"{found[e]}/{sub}{name}") for _, e in chosen])
        header = ["Sentence"] + [f"{label} (epoch {e}{', best' if e == best and label != 'best' else ''})"
                                 for label, e in chosen]
        blocks.append((f"<h3>{html.escape(sub.rstrip('/').replace('_', ' '))}</h3>" if sub else "")
                      + table(header, rows, "players"))
    return "<h2>Listen: first, best and latest epoch</h2>" + "".join(blocks)


def before_after_tables(report):
    """Validation and voice-quality measures of a feedback run, before and after the tune."""
    measures = [("validation mel", report.get("validation_mel") or {})]
    measures += [(title, (report.get("quality") or {}).get(key) or {}) for key, title in
                 (("mcd", "MCD-DTW, dB"), ("dur_ratio", "duration ratio"), ("dnsmos_ovrl", "DNSMOS OVRL"))]
    rows = []
    for title, by_set in measures:
        for name, row in by_set.items():
            if isinstance(row, dict):
                rows.append([html.escape(title), html.escape(SET_NAMES.get(name, name.replace("_", " "))),
                             number(row.get("before")), number(row.get("after")),
                             change(row.get("before"), row.get("after"))])
    if not rows:
        return ""
    return "<h2>Before and after the tune</h2>" + table(["Measure", "Clips", "Before", "After", "Change"], rows)


def feedback_players(output_dir, report):
    """Each feedback sentence as recorded, as the input voice said it and as the tuned voice says it; then the
    fixed evaluation sentences before and after, and the clips that were left out."""
    samples = report.get("samples") or {}
    fb = report.get("feedback") or {}
    held_out = {run_files.sample_name(n) for n in fb.get("held_out_clips", [])}
    rows = []
    for name, text in (samples.get("feedback") or {}).items():
        role = "held out" if name in held_out else "trained on" if os.path.isfile(
            os.path.join(output_dir, "samples", "recorded", name)) else "recording unusable"
        rows.append([html.escape(text), role, player(output_dir, f"samples/recorded/{name}"),
                     player(output_dir, f"samples/before/feedback/{name}"),
                     player(output_dir, f"samples/after/feedback/{name}")])
    out = ""
    if rows:
        out += ("<h2>Feedback sentences</h2><p>The recordings trained on (and the held-out ones, never trained "
                "on), the input voice and the tuned voice.</p>"
                + table(["Sentence", "Clip", "Recorded", "Before", "After"], rows, "players"))
    rows = [[html.escape(text), player(output_dir, f"samples/before/eval/{name}"),
             player(output_dir, f"samples/after/eval/{name}")] for name, text in (samples.get("eval") or {}).items()]
    if rows:
        out += "<h2>Evaluation sentences</h2>" + table(["Sentence", "Before", "After"], rows, "players")
    skipped = fb.get("skipped_clips") or []
    if skipped:
        out += "<h3>Recordings left out</h3><ul>" + "".join(
            f"<li>{html.escape(str(s.get('file')))}: {html.escape(str(s.get('reason')).replace('_', ' '))} "
            f"({html.escape(str(s.get('detail')))})</li>" for s in skipped) + "</ul>"
    return out


def verdict_section(report):
    """The verdict (verdict.py): keep or reject, who decided, how sure, every reason, each guard's result."""
    verdict = report.get("verdict")
    if not isinstance(verdict, dict):
        return ""
    decision = str(verdict.get("decision"))
    said = [f"decided by the {verdict['decided_by']}" if verdict.get("decided_by") else "",
            f"how sure: {verdict['confidence']}" if verdict.get("confidence") else ""]
    reasons = "".join(f"<li>{html.escape(str(r))}</li>" for r in verdict.get("reasons") or [])
    guards = verdict.get("guards") if isinstance(verdict.get("guards"), dict) else {}
    rows = [[html.escape(str(g.get("measure", name))), words(GUARD_RESULTS, g.get("status"))]
            for name, g in guards.items() if isinstance(g, dict)]  # (their reasons are listed above)
    listening = report.get("listening")
    if isinstance(listening, dict) and listening.get("pairs"):
        # Listeners who did not decide preferred the tune (verdict.decide: else they reject it).
        deciding = verdict.get("decided_by") == "listeners"
        result = ("fail" if decision == "reject" else "pass") if deciding else "pass"
        rows.append(["listeners (blind comparison)", result + (" (decides the verdict)" if deciding else "")])
    return (f'<h2>Verdict: <span class="decision {html.escape(decision)}">{html.escape(decision)}</span></h2>'
            + (f"<p>{html.escape('; '.join(s for s in said if s))}.</p>" if any(said) else "")
            + (f"<ul>{reasons}</ul>" if reasons else "")
            + (table(["Guard", "Result"], rows) if rows else ""))


def listening_section(report):
    result = report.get("listening")
    if not isinstance(result, dict):
        return ""
    rows = [[html.escape(str(s.get("text"))), words(run_files.SENTENCE_KINDS, s.get("kind")),
             words(PREFERRED, s.get("preferred"))] for s in result.get("per_sentence") or []]
    return ("<h2>Blind comparison</h2>"
            f"<p>{result.get('pairs')} pairs heard: the tuned voice preferred in {result.get('tuned_preferred')}, "
            f"the input voice in {result.get('input_preferred')}, no difference in {result.get('no_difference')} "
            f"(two-sided sign test p = {number(result.get('p_value'))}).</p>"
            + (table(["Sentence", "From", "Preferred"], rows) if rows else ""))


def next_commands(output_dir, config, progress, report):
    """[(what, command line)]: what to run next after the run in `output_dir`, each line complete as it runs
    (run_files: the interpreter that ran, the training folder, the voice)."""
    args = config.get("args", {})
    data_dir = args.get("data_dir", run_files.DEFAULT_DATA_DIR)
    ended = (progress or {}).get("ended")
    final = os.path.join(output_dir, run_files.FINAL_MODEL)
    sentences = run_files.sentences_file()
    steps = []
    if report is not None:
        if report.get("status") == "done":
            if "listening" not in report:
                steps.append(("Compare the tuned voice with the input voice, blind",
                              run_files.compare_command(output_dir, data_dir)))
            rejected = (report.get("verdict") or {}).get("decision") == "reject"
            steps.append(("Put the tuned voice to use; the voice it replaces is kept for --rollback"
                          + (" (the verdict is reject: refused unless --force)" if rejected else ""),
                          run_files.promote_command(output_dir, data_dir)))
            steps.append(("Listen to the tuned voice and record what it still says badly",
                          run_files.listen_command(sentences, final, data_dir)))
        else:
            steps.append(("Continue the run" + (" if it stops before its end" if ended is None else ""),
                          run_files.resume_command("train_feedback", report.get("model", "MODEL"), output_dir,
                                                   data_dir)))
    elif ended in (None, "interrupted") or not os.path.isdir(final):
        steps.append(("Continue the run if it stops before its end (the same --model and --data_dir)"
                      if ended is None else "Continue the run (the same --model and --data_dir)",
                      run_files.resume_command("train_vits", args.get("model", "MODEL"), output_dir, data_dir)))
    else:
        steps.append(("Hear the voice sentence by sentence and record what it says badly",
                      run_files.listen_command(sentences, final, data_dir)))
        steps.append(("Tune it on those recordings", run_files.tune_command(final, data_dir)))
    return steps


def print_next(output_dir):
    """The terminal's closing lines: what to run next, as the run's page says it."""
    steps = next_commands(output_dir, run_files.read_run_config(output_dir) or {},
                          run_files.read_progress(output_dir), run_files.read_report(output_dir))
    for what, command in steps:
        print(f"next: {what[0].lower() + what[1:]}: {command}")


def next_steps(output_dir, config, progress, report):
    items = "".join(f'<li>{html.escape(what)}<div class="command"><code>{html.escape(cmd)}</code>'
                    '<button class="copy" type="button">copy</button></div></li>'
                    for what, cmd in next_commands(output_dir, config, progress, report))
    return f"<h2>What to run next</h2><ol class=\"next\">{items}</ol>"


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 64rem; margin: 1rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 1.6rem; } h3 { font-size: 1rem; }
  table { border-collapse: collapse; margin: .4rem 0; }
  th, td { text-align: left; padding: .25rem .6rem; border-bottom: 1px solid #ddd; vertical-align: middle; }
  table.facts th { color: #555; font-weight: 500; }
  audio { height: 2rem; width: 14rem; }
  .charts { display: flex; flex-wrap: wrap; gap: .8rem; }
  .chart { border: 1px solid #eee; background: #fff; }
  .chart .title { font-size: 13px; font-weight: 600; }
  .chart .tick, .chart .legend { font-size: 11px; }
  .chart .frame { fill: none; stroke: #ccc; }
  .chart .best { stroke: #333; stroke-dasharray: 4 3; }
  .chart .reference { stroke: #999; stroke-dasharray: 1 3; }
  .decision { padding: 0 .4rem; border-radius: .2rem; }
  .decision.keep { background: #dff3df; }
  .decision.reject { background: #fbe0dc; }
  .command { display: flex; gap: .5rem; align-items: center; margin: .2rem 0 .6rem; }
  .command code { background: #f4f4f4; padding: .3rem .5rem; user-select: all; white-space: pre-wrap; }
  .missing, .small { color: #888; } .small { font-size: 12px; margin-top: 2rem; }
</style>
</head>
<body>
{body}
<script>
"use strict";
// Copy a command: the clipboard where the browser allows it (a file:// page may not), else select it.
for (const button of document.querySelectorAll("button.copy")) {
  button.onclick = () => {
    const code = button.previousElementSibling;
    const select = () => window.getSelection().selectAllChildren(code);
    if (navigator.clipboard) navigator.clipboard.writeText(code.textContent).then(
      () => { button.textContent = "copied"; }, select);
    else select();
  };
}
</script>
</body>
</html>
"""
