"""The verdict on a feedback run: keep the tuned voice or reject it, judged on held-out clips only (never on
the clips it trained on), every reason naming its measure, before, after and threshold; and the same verdict
reconsidered once listeners have compared the two voices blind.

Guards (report.json's figures, `feedback_run.measure_after`):
- feedback: the held-out feedback clips' mel L1 must fall, and no more of them get worse than better;
- original mel, original MCD-DTW: the held-out original clips must not get worse beyond a tolerance, by their
  mean, nor by a sure majority of clips worse beyond it (a paired sign test, clip by clip);
- duration: the duration ratio (spoken / recorded) of the held-out original clips must not drift from 1;
- intelligibility (with --asr_model): the character error rate must not rise beyond a tolerance.
A core guard (feedback, original mel) with too few held-out clips cannot be judged: that is a reject, said
as such. How sure each guard is comes from the paired comparison of its clips; how sure it can be with so
many recordings is what the listening page shows while they are recorded (`outlook`).
"""

import math
import os

from voicetune.common import run_errors
from voicetune.common import run_files
from voicetune.night import training_flags

# The tolerances' defaults: train_feedback.py's verdict flags carry them, report.json records those used.
TOLERANCES = dict(max_worse_mel=0.03, max_worse_mcd=0.03, max_dur_drift=0.10, max_worse_cer=0.02, min_held_out=1)
SURE_P = 0.05  # a sign test this unlikely under "no change" is a sure difference
DIVERGED = "the tuned voice's figures are not numbers: it diverged"


def sign_test(wins, losses):
    """Two-sided sign test: how likely `wins` against `losses` (ties left out) is when neither side is better."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(max(wins, losses), n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


# The fewest clips whose sign test can be sure: 5 clips that all agree still happen by chance 1 time in 16.
SURE_CLIPS = next(k for k in range(1, 64) if sign_test(k, 0) < SURE_P)


def paired(before, after, tolerance=0.0):
    """Clip by clip: how many got better or worse at all, and beyond `tolerance` (relative), with sign tests."""
    pairs = list(zip(before, after))
    better = sum(a < b for b, a in pairs)
    worse = sum(a > b for b, a in pairs)
    better_beyond = sum(a < b * (1 - tolerance) for b, a in pairs)
    worse_beyond = sum(a > b * (1 + tolerance) for b, a in pairs)
    return dict(clips=len(pairs), better=better, worse=worse, p_value=sign_test(better, worse),
                better_beyond=better_beyond, worse_beyond=worse_beyond,
                p_beyond=sign_test(worse_beyond, better_beyond))


def per_clip(report, set_name, key):
    """(before, after) lists of one measure of a held-out set's clips, or None where a side lacks them."""
    sides = [(report.get(when) or {}).get(set_name) or {} for when in ("before", "after")]
    lists = [side.get("per_clip", {}).get(key) for side in sides]
    return tuple(lists) if all(lists) and len(lists[0]) == len(lists[1]) else None


def pct(share):
    """+29%, +3%, or +1.4% for a change under a tenth that is no whole percent."""
    if not math.isfinite(share):
        return "not a number"
    percent = round(100 * share, 1)
    return f"{percent:+.0f}%" if abs(percent) >= 10 or percent == round(percent) else f"{percent:+.1f}%"


def sureness(pair):
    if pair["clips"] < SURE_CLIPS:
        return f"{pair['clips']} clip{'s' * (pair['clips'] != 1)}: too few to be sure"
    p = pair["p_value"]
    return f"sign test p={p:.2g}: " + ("sure" if p < SURE_P else "not sure")


def unjudged(name, measure, held_out, min_held_out, hint):
    return dict(name=name, measure=measure, status="unjudged", clips=held_out,
                reason=f"reject: cannot judge the {measure}: {held_out} held-out clip{'s' * (held_out != 1)} "
                       f"(at least {min_held_out} needed){hint}")


def outlook(recorded, val_size, min_held_out=TOLERANCES["min_held_out"]):
    """What the verdict can say of a feedback run on `recorded` recordings, before it runs: how many are held
    out to judge the tune (the run's own split, training_flags.held_out_count), the smallest p-value a sign
    test on that many clips can reach, and how many more recordings it takes to be judged at all and to be
    sure (None: --val_size never holds out that many); `line` says it in words, for the listening page."""
    held_out = training_flags.held_out_count(recorded, val_size, at_least_one=True)
    best_p = sign_test(held_out, 0)

    def more_for(clips):
        if val_size < clips:
            return None
        n = recorded
        while training_flags.held_out_count(n, val_size, at_least_one=True) < clips:
            n += 1
        return n - recorded
    to_judge, to_be_sure = more_for(min_held_out), more_for(SURE_CLIPS)
    line = f"{recorded} recorded: {held_out or 'none'} held out to judge the tune"
    if held_out < min_held_out:
        line += ", so the verdict cannot judge it and would reject it: " + (
            f"record {to_judge} more to have {min_held_out} held out (one recording in ten is, at least one from 4)"
            if to_judge is not None else f"--val_size {val_size} holds none out")
    else:
        line += f"; with {held_out} clip{'s' * (held_out != 1)} the verdict can at best be p = {best_p:.2g}"
    if best_p < SURE_P:
        line += f": sure if they agree (p < {SURE_P:g})"
    else:
        line += (f"; to be sure (p < {SURE_P:g}) it needs {SURE_CLIPS} held-out clips that agree: "
                 + (f"{to_be_sure} more recording{'s' * (to_be_sure != 1)}" if to_be_sure is not None
                    else f"more than --val_size {val_size} holds out"))
    return dict(recorded=recorded, held_out=held_out, best_p=best_p, sure=best_p < SURE_P, to_judge=to_judge,
                to_be_sure=to_be_sure, line=line)


def feedback_guard(report, tol):
    """The held-out feedback clips must get better: the tune has to help on sentences it did not train on."""
    measure = "held-out feedback mel"
    row = report["validation_mel"].get("feedback") or {}
    pairs = per_clip(report, "feedback", "mel")
    held_out = len(pairs[0]) if pairs else 0
    if row.get("before") is None or held_out < tol["min_held_out"]:
        return unjudged("feedback", measure, held_out, tol["min_held_out"],
                        ": one recording in ten is held out once there are 4 or more; record more sentences, or "
                        "promote with --force")
    before, after = row["before"], row["after"]
    pair = paired(*pairs)
    change = after / before - 1
    figures = f"{measure} {before:.3f} -> {after:.3f} ({pct(change)}, must fall)"
    if not math.isfinite(after):
        status, why = "fail", DIVERGED
    elif after >= before:
        status, why = "fail", "the tune did not improve the sentences it was not trained on"
    elif pair["worse"] > pair["better"]:
        status, why = "fail", (f"only {pair['better']} of {pair['clips']} clips better: the mean fell on a few, "
                               "most got worse")
    else:
        status, why = "pass", f"{pair['better']} of {pair['clips']} clips better ({sureness(pair)})"
    return dict(name="feedback", measure=measure, status=status, before=before, after=after, change=change,
                limit="must fall", **pair, reason=f"{'reject' if status == 'fail' else 'keep'}: {figures}: {why}")


def no_worse_guard(name, measure, before, after, pairs, limit, min_held_out):
    """A held-out original measure (lower is better) must not get worse beyond `limit` (relative): not by its
    mean, and not by a sure majority of clips worse beyond it."""
    held_out = len(pairs[0]) if pairs else 0
    if before is None or after is None or held_out < min_held_out:
        return unjudged(name, measure, held_out, min_held_out,
                        ": --data_dir's held-out clips measure it (--val_size); or promote with --force")
    pair = paired(*pairs, tolerance=limit)
    change = after / before - 1
    figures = f"{measure} {before:.3f} -> {after:.3f} ({pct(change)}, limit {pct(limit)})"
    if not math.isfinite(after):
        status, why = "fail", DIVERGED
    elif change > limit:
        status, why = "fail", "the voice got worse on what it knew"
    elif pair["worse_beyond"] > pair["better_beyond"] and pair["p_beyond"] < SURE_P:
        status, why = "fail", (f"{pair['worse_beyond']} of {pair['clips']} clips got worse by more than "
                               f"{pct(limit)[1:]}, {pair['better_beyond']} better "
                               f"(sign test p={pair['p_beyond']:.2g}): "
                               "the voice got worse on most of what it knew")
    else:
        status, why = "pass", f"{pair['worse']} of {pair['clips']} clips worse ({sureness(pair)})"
    return dict(name=name, measure=measure, status=status, before=before, after=after, change=change, limit=limit,
                **pair, reason=f"{'reject' if status == 'fail' else 'keep'}: {figures}: {why}")


def duration_guard(report, tol):
    """The held-out original clips' duration ratio must stay as near 1 as it was (within the drift limit)."""
    measure = "held-out original duration ratio"
    row = (report.get("quality") or {}).get("dur_ratio", {}).get("original") or {}
    before, after = row.get("before"), row.get("after")
    if before is None or after is None:
        return None
    drift = abs(after - 1) - abs(before - 1)
    limit = tol["max_dur_drift"]
    figures = f"{measure} {before:.2f} -> {after:.2f} (drift {drift:+.2f} from 1, limit {limit:+.2f})"
    status = "pass" if drift <= limit else "fail"  # a drift that is not a number fails
    why = ("the pace held" if status == "pass" else
           "the voice speaks at another pace" if math.isfinite(drift) else DIVERGED)
    return dict(name="duration", measure=measure, status=status, before=before, after=after, drift=drift,
                limit=limit, reason=f"{'reject' if status == 'fail' else 'keep'}: {figures}: {why}")


def intelligibility_guard(report, tol):
    """With --asr_model: the character error rate of the sentences never trained on must not rise."""
    cer = report.get("intelligibility")
    if not cer:
        return None
    measure = "CER of held-out and evaluation sentences"
    before, after, limit = cer["before"], cer["after"], tol["max_worse_cer"]
    rows = cer.get("per_sentence", [])
    pair = paired([r["before"] for r in rows], [r["after"] for r in rows])
    figures = (f"{measure} {before:.3f} -> {after:.3f} ({100 * (after - before):+.1f} points, "
               f"limit {100 * limit:+.1f} points)")
    status = "pass" if after - before <= limit else "fail"
    why = ("the voice is harder to understand" if status == "fail"
           else f"{pair['worse']} of {pair['clips']} sentences worse ({sureness(pair)})")
    return dict(name="intelligibility", measure=measure, status=status, before=before, after=after, limit=limit,
                **pair, reason=f"{'reject' if status == 'fail' else 'keep'}: {figures}: {why}")


def training_notes(report):
    """What the figures cannot show about the run itself: fp16 given up, steps skipped."""
    notes = []
    if report.get("fp32_from_step") is not None:
        notes.append(f"note: fp16 overflowed and the run went on in fp32 from step {report['fp32_from_step']} "
                     "(slower; the figures above judge the result)")
    skipped, steps = report.get("skipped_steps", 0), report.get("steps", 0)
    if skipped:
        share = skipped / max(1, steps + skipped)
        notes.append(f"note: {skipped} of {steps + skipped} steps were skipped as non-finite ({share:.0%})"
                     + (": many; the tune trained less than planned" if share > 0.1 else ""))
    return notes


def listening_line(listening):
    tuned, given = listening["tuned_preferred"], listening["input_preferred"]
    people = len(listening.get("listeners") or ())
    return (f"listeners preferred the tune in {tuned} of {listening['pairs']} pairs, the input voice in {given} "
            f"({listening['no_difference']} no difference; p={listening['p_value']:.2g}"
            + (f"; {people} listener{'s' * (people != 1)})" if people else ")"))


def decide(report, *, max_worse_mel=TOLERANCES["max_worse_mel"], max_worse_mcd=TOLERANCES["max_worse_mcd"],
           max_dur_drift=TOLERANCES["max_dur_drift"], max_worse_cer=TOLERANCES["max_worse_cer"],
           min_held_out=TOLERANCES["min_held_out"], listening=None):
    """{"decision": "keep"|"reject", "reasons", "guards", "decided_by": "guards"|"listeners", "confidence",
    "tolerances"} of a finished run's report.json.

    listening: a blind A/B result {"pairs", "tuned_preferred", "input_preferred", "no_difference", "p_value",
    "per_sentence"} (blind_compare.pooled_result: every listener's judgements, pooled). The listeners decide
    only where they are sure (p < 0.05): a tune they surely did not prefer is rejected by them, whatever the
    guards say; one they surely preferred is kept where the guards only could not judge. A tie, or any split
    that is not sure, is no decision by the listeners: the guards decide.
    """
    tol = dict(max_worse_mel=max_worse_mel, max_worse_mcd=max_worse_mcd, max_dur_drift=max_dur_drift,
               max_worse_cer=max_worse_cer, min_held_out=min_held_out)
    original = report["validation_mel"].get("original") or {}
    mcd = (report.get("quality") or {}).get("mcd", {}).get("original") or {}
    guards = [feedback_guard(report, tol),
              no_worse_guard("original_mel", "held-out original mel", original.get("before"), original.get("after"),
                             per_clip(report, "original", "mel"), max_worse_mel, min_held_out)]
    notes = []
    if report.get("quality"):
        guards.append(no_worse_guard("original_mcd", "held-out original MCD-DTW", mcd.get("before"), mcd.get("after"),
                                     per_clip(report, "original", "mcd"), max_worse_mcd, min_held_out))
        guards.append(duration_guard(report, tol))
    else:
        notes.append("note: MCD-DTW and the duration ratio were not measured (--eval_clips 0): not judged")
    guards.append(intelligibility_guard(report, tol))
    guards = [g for g in guards if g]
    notes += training_notes(report)

    failed = [g for g in guards if g["status"] == "fail"]
    cannot = [g for g in guards if g["status"] == "unjudged"]
    decision = "reject" if failed or cannot else "keep"
    decided_by = "guards"
    reasons = [g["reason"] for g in failed + cannot] + [g["reason"] for g in guards if g["status"] == "pass"]
    if listening and listening.get("pairs"):
        line = listening_line(listening)
        sure = listening["p_value"] < SURE_P
        if sure and listening["input_preferred"] > listening["tuned_preferred"]:
            decision, decided_by = "reject", "listeners"
            reasons.insert(0, f"reject: {line}: they surely preferred the input voice")
        elif sure and cannot and not failed:
            decision, decided_by = "keep", "listeners"
            reasons.insert(0, f"keep: {line}: the listeners judged what the held-out clips could not")
        elif sure:
            reasons.append(f"{decision}: {line}")
        else:
            tie = listening["input_preferred"] == listening["tuned_preferred"]
            reasons.append(f"{decision}: {line}: {'a tie' if tie else 'no sure preference'}, no decision by the "
                           "listeners: the guards decide")
    reasons += notes
    return dict(decision=decision, reasons=reasons, guards={g["name"]: g for g in guards}, decided_by=decided_by,
                confidence=confidence(guards, failed or cannot, decided_by, listening), tolerances=tol)


def confidence(guards, deciding, decided_by, listening):
    """One sentence on how sure the decision is: the paired comparison of the guards that decided it."""
    if decided_by == "listeners":  # which they do only when sure
        return f"listeners, p={listening['p_value']:.2g}: sure"
    if any(g["status"] == "unjudged" for g in deciding):
        return "not judged: too few held-out clips"
    deciding = deciding or [g for g in guards if g["name"] == "feedback"]
    return "; ".join(f"{g['measure']}: " + (sureness(g) if "clips" in g and "p_value" in g else "by its mean")
                     for g in deciding)


def summary(verdict):
    """The one printed line: the decision, how sure it is, and why (every reason is in report.json)."""
    head = f"verdict: {verdict['decision'].upper()} by the {verdict['decided_by']}"
    if verdict["decision"] == "keep" and verdict["decided_by"] == "guards":
        changes = [f"{g['measure'].replace('held-out ', '')} " + (pct(g["change"]) if "change" in g
                                                                   else f"{g['before']:.2f} -> {g['after']:.2f}")
                   for g in verdict["guards"].values()]
        body = f"every guard passed on held-out clips ({', '.join(changes)})"
    else:
        deciding = [r for r in verdict["reasons"] if r.startswith(verdict["decision"])]
        body = deciding[0].split(": ", 1)[1] + (f" (+{len(deciding) - 1} more)" if len(deciding) > 1 else "")
    return f"{head}: {body}; how sure: {verdict['confidence']}"


def print_verdict(verdict):
    """The summary line, then every reason on a line of its own."""
    print(summary(verdict))
    for line in verdict["reasons"]:
        print(f"  {line}")


def reconsider(run_dir, listening):
    """Decide a finished run again with a blind listening result, with the tolerances it was judged with,
    and rewrite its report.json (atomically) with the new verdict and the listening result; return it."""
    path = os.path.join(run_dir, run_files.REPORT)
    report = run_files.read_report(run_dir)
    if report is None:
        raise run_errors.TrainingError(f"{path}: cannot read the run's report (missing, or not a JSON object)")
    if "verdict" not in report:
        raise run_errors.TrainingError(f"{path}: no verdict to reconsider (the run has not finished)")
    report["verdict"] = decide(report, **report["verdict"]["tolerances"], listening=listening)
    report["listening"] = listening
    run_files.write_report(run_dir, report)
    return report["verdict"]
