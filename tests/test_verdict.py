"""The verdict on a feedback run: each guard judged on held-out clips, each broken on purpose; the paired
sign test against its closed form; listeners' blind preferences; and the multilingual MMS recogniser with
its Kurmanji adapter, loaded offline from a Hugging Face cache."""

import glob
import json
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from voicetune.common import run_errors
import train_vits
from voicetune.feedback import verdict
from voicetune.night import vits_trainer
from voicetune.voice import voice_quality
from conftest import MMS, one_error_line, quick, tiny_mms


def figures(before, after):
    """A held-out set's report.json figures: its mean mel and each clip's (the mean is the clips' mean)."""
    return (dict(mel=float(np.mean(before)), per_clip=dict(mel=list(before), mcd=list(before), dur_ratio=[1.0])),
            dict(mel=float(np.mean(after)), per_clip=dict(mel=list(after), mcd=list(after), dur_ratio=[1.0])))


def make_report(feedback=((2.0,), (1.8,)), original=((2.0,) * 10, (1.98,) * 10), mcd=(8.0, 8.1), dur=(1.05, 1.02),
                cer=None, eval_clips=True, **extra):
    """A finished run's report.json as feedback_run.measure_after writes it, with the given held-out figures."""
    report = dict(before={}, after={}, validation_mel={}, quality={}, steps=100, skipped_steps=0,
                  fp32_from_step=None, **extra)
    for name, clips in (("feedback", feedback), ("original", original)):
        if clips is None:
            report["before"][name] = report["after"][name] = None
            report["validation_mel"][name] = dict(before=None, after=None, change=None)
            continue
        report["before"][name], report["after"][name] = figures(*clips)
        b, a = report["before"][name]["mel"], report["after"][name]["mel"]
        report["validation_mel"][name] = dict(before=b, after=a, change=a - b)
    if eval_clips:
        report["quality"] = dict(mcd=dict(original=dict(before=mcd[0], after=mcd[1], change=mcd[1] - mcd[0])),
                                 dur_ratio=dict(original=dict(before=dur[0], after=dur[1], change=dur[1] - dur[0])))
        for when, value in zip(("before", "after"), mcd if original else ()):
            report[when]["original"]["per_clip"]["mcd"] = [value] * len(report[when]["original"]["per_clip"]["mel"])
    if cer:
        report["intelligibility"] = dict(before=cer[0], after=cer[1], sentences=2,
                                         per_sentence=[dict(text="a", before=cer[0], after=cer[1])] * 2)
    return report


def rejecting(result):
    return [r for r in result["reasons"] if r.startswith("reject")]


def test_a_tune_better_everywhere_is_kept_and_says_how_sure():
    result = verdict.decide(make_report())
    assert result["decision"] == "keep" and result["decided_by"] == "guards"
    assert rejecting(result) == []
    assert set(result["guards"]) == {"feedback", "original_mel", "original_mcd", "duration"}
    assert all(g["status"] == "pass" for g in result["guards"].values())
    assert result["reasons"][0] == ("keep: held-out feedback mel 2.000 -> 1.800 (-10%, must fall): 1 of 1 clips "
                                    "better (1 clip: too few to be sure)")
    assert result["confidence"] == "held-out feedback mel: 1 clip: too few to be sure"
    assert result["tolerances"] == verdict.TOLERANCES
    line = verdict.summary(result)
    assert line == ("verdict: KEEP by the guards: every guard passed on held-out clips (feedback mel -10%, "
                           "original mel -1%, original MCD-DTW +1.2%, original duration ratio 1.05 -> 1.02); how sure: "
                           "held-out feedback mel: 1 clip: too few to be sure")
    # Six held-out clips that all got better are sure (p = 2/64).
    sure = verdict.decide(make_report(feedback=((2.0,) * 6, (1.8,) * 6)))
    assert sure["confidence"] == "held-out feedback mel: sign test p=0.031: sure"


def test_the_example_reason_is_printed_exactly():
    result = verdict.decide(make_report(original=((1.862,), (2.410,))))
    assert result["decision"] == "reject"
    assert rejecting(result) == ["reject: held-out original mel 1.862 -> 2.410 (+29%, limit +3%): the voice got "
                                 "worse on what it knew"]
    assert verdict.summary(result).startswith("verdict: REJECT by the guards: held-out original mel 1.862 -> 2.410 "
                                              "(+29%, limit +3%): the voice got worse on what it knew; how sure: ")


@pytest.mark.parametrize("after", [1.02, 1.029, 1.031, 1.05, 0.9])
def test_the_decision_agrees_with_the_figures_it_prints(after):
    # Mean and clips move together: the verdict is reject exactly when the printed change passes the limit.
    result = verdict.decide(make_report(original=((1.0,) * 3, (after,) * 3)), max_worse_mel=0.03)
    guard = result["guards"]["original_mel"]
    assert guard["change"] == pytest.approx(after - 1.0)
    assert (guard["status"] == "fail") == (after - 1.0 > 0.03)
    assert (result["decision"] == "reject") == (after - 1.0 > 0.03)
    assert f"1.000 -> {after:.3f}" in guard["reason"] and "limit +3%" in guard["reason"]


def test_each_guard_broken_on_purpose_rejects_with_its_reason():
    cases = {
        # The tune did not help the feedback sentences it did not train on.
        "feedback": (make_report(feedback=((2.0,), (2.1,))),
                     "reject: held-out feedback mel 2.000 -> 2.100 (+5%, must fall): the tune did not improve"),
        # The mean fell thanks to one clip, but two of three got worse.
        "feedback_clips": (make_report(feedback=((2.0, 2.0, 2.0), (2.05, 2.05, 1.0))),
                           "only 1 of 3 clips better"),
        "original_mel": (make_report(original=((2.0,) * 10, (2.2,) * 10)),
                         "reject: held-out original mel 2.000 -> 2.200 (+10%, limit +3%): the voice got worse"),
        # Ten of eleven clips 5% worse, one much better: the mean holds, the sign test is sure (p = 2 x 12/2048).
        "original_majority": (make_report(original=((2.0,) * 11, (2.1,) * 10 + (1.0,))),
                              "10 of 11 clips got worse by more than 3%, 1 better (sign test p=0.012): the voice got "
                              "worse on most of what it knew"),
        "original_mcd": (make_report(mcd=(8.0, 9.0)),
                         "reject: held-out original MCD-DTW 8.000 -> 9.000 (+12%, limit +3%)"),
        "duration": (make_report(dur=(1.05, 1.3)),
                     "reject: held-out original duration ratio 1.05 -> 1.30 (drift +0.25 from 1, limit +0.10): the "
                     "voice speaks at another pace"),
        # Slower is a drift as much as faster.
        "duration_slower": (make_report(dur=(0.95, 0.7)), "0.95 -> 0.70 (drift +0.25 from 1, limit +0.10)"),
        # A diverged tune's figures are NaN, which no comparison would catch.
        "diverged": (make_report(original=((2.0,), (math.nan,))),
                     "reject: held-out original mel 2.000 -> nan (not a number, limit +3%): the tuned voice's "
                     "figures are not numbers: it diverged"),
        "intelligibility": (make_report(cer=(0.20, 0.25)),
                            "reject: CER of held-out and evaluation sentences 0.200 -> 0.250 (+5.0 points, limit "
                            "+2.0 points): the voice is harder to understand"),
    }
    for name, (report, reason) in cases.items():
        result = verdict.decide(report)
        assert result["decision"] == "reject", name
        assert any(reason in r for r in rejecting(result)), (name, result["reasons"])
        assert len(rejecting(result)) == 1, (name, result["reasons"])
    # Within their tolerances the same guards pass.
    assert verdict.decide(make_report(cer=(0.20, 0.21), dur=(1.05, 1.1)))["decision"] == "keep"
    assert verdict.decide(make_report(mcd=(8.0, 8.2)), max_worse_mcd=0.03)["decision"] == "keep"
    assert verdict.decide(make_report(mcd=(8.0, 8.2)), max_worse_mcd=0.02)["decision"] == "reject"


def test_a_held_out_feedback_mel_that_did_not_fall_is_a_fail():
    # Equal is no improvement: the guard says "must fall", and the clips, none better or worse, cannot save it.
    for clips in (((2.0,), (2.0,)), ((2.0, 1.5, 3.0), (2.0, 1.5, 3.0))):
        result = verdict.decide(make_report(feedback=clips))
        assert result["decision"] == "reject" and result["guards"]["feedback"]["status"] == "fail", clips
        before = float(np.mean(clips[0]))
        assert rejecting(result) == [f"reject: held-out feedback mel {before:.3f} -> {before:.3f} (+0%, must fall): "
                                     "the tune did not improve the sentences it was not trained on"]
    # The least fall passes.
    assert verdict.decide(make_report(feedback=((2.0,), (1.999,))))["guards"]["feedback"]["status"] == "pass"


def test_a_duration_drift_that_is_not_a_number_fails():
    for dur in ((1.05, math.nan), (math.nan, 1.0), (1.0, math.inf)):
        result = verdict.decide(make_report(dur=dur))
        assert result["decision"] == "reject" and result["guards"]["duration"]["status"] == "fail", dur
        assert [r.split(" (drift")[0] for r in rejecting(result)] == [
            f"reject: held-out original duration ratio {dur[0]:.2f} -> {dur[1]:.2f}"], dur
        assert rejecting(result)[0].endswith(verdict.DIVERGED), "a figure that is not a number is said as such"


def test_too_few_held_out_clips_is_said_and_never_a_keep():
    result = verdict.decide(make_report(feedback=None))
    assert result["decision"] == "reject" and result["guards"]["feedback"]["status"] == "unjudged"
    assert rejecting(result)[0].startswith("reject: cannot judge the held-out feedback mel: 0 held-out clips (at "
                                           "least 1 needed)")
    assert result["confidence"] == "not judged: too few held-out clips"
    result = verdict.decide(make_report(original=None))
    assert rejecting(result)[0].startswith("reject: cannot judge the held-out original mel: 0 held-out clips")
    result = verdict.decide(make_report(feedback=((2.0, 2.0), (1.5, 1.5))), min_held_out=3)
    assert rejecting(result)[0].startswith("reject: cannot judge the held-out feedback mel: 2 held-out clips (at "
                                           "least 3 needed)")
    # Voice quality not measured at all (--eval_clips 0) is said, and judged on the rest.
    result = verdict.decide(make_report(eval_clips=False))
    assert result["decision"] == "keep"
    assert "note: MCD-DTW and the duration ratio were not measured (--eval_clips 0): not judged" in result["reasons"]


def test_fp32_fallback_and_skipped_steps_are_said():
    result = verdict.decide(make_report() | dict(fp32_from_step=40, skipped_steps=30, steps=70))
    assert "note: fp16 overflowed and the run went on in fp32 from step 40 (slower; the figures above judge the " \
           "result)" in result["reasons"]
    assert "note: 30 of 100 steps were skipped as non-finite (30%): many; the tune trained less than planned" \
           in result["reasons"]


def test_the_sign_test_is_the_binomial_tail():
    assert verdict.sign_test(10, 0) == 2 / 1024
    assert verdict.sign_test(0, 10) == 2 / 1024
    assert verdict.sign_test(8, 2) == pytest.approx(2 * (math.comb(10, 8) + 10 + 1) / 1024)
    assert verdict.sign_test(5, 5) == 1.0 and verdict.sign_test(0, 0) == 1.0


def listened(tuned, given, p=None, same=0):
    """A listening result; its p-value the sign test's unless given."""
    return dict(pairs=tuned + given + same, tuned_preferred=tuned, input_preferred=given, no_difference=same,
                p_value=verdict.sign_test(tuned, given) if p is None else p, per_sentence=[])


def test_listeners_decide_only_where_they_are_sure_and_a_tie_is_no_decision():
    kept = make_report()
    guards = verdict.decide(kept)
    assert (guards["decision"], guards["decided_by"]) == ("keep", "guards")
    # One listener's 3:3 tie after the guards' keep: no decision by the listeners, the guards' keep stands.
    result = verdict.decide(kept, listening=listened(3, 3))
    assert (result["decision"], result["decided_by"]) == ("keep", "guards")
    assert result["reasons"] == guards["reasons"] + [
        "keep: listeners preferred the tune in 3 of 6 pairs, the input voice in 3 (0 no difference; p=1): a tie, no "
        "decision by the listeners: the guards decide"]
    assert result["confidence"] == guards["confidence"]
    # Against the tune, but not surely (2 of 7: p = 0.45): no decision either.
    result = verdict.decide(kept, listening=listened(2, 5))
    assert (result["decision"], result["decided_by"]) == ("keep", "guards")
    assert result["reasons"][-1] == ("keep: listeners preferred the tune in 2 of 7 pairs, the input voice in 5 (0 no "
                                     "difference; p=0.45): no sure preference, no decision by the listeners: the "
                                     "guards decide")
    # Surely against (0 of 6: p = 2/64): the listeners reject it, whatever the guards said.
    for report in (kept, make_report(original=((2.0,), (3.0,)))):
        result = verdict.decide(report, listening=listened(0, 6, same=1))
        assert (result["decision"], result["decided_by"]) == ("reject", "listeners")
        assert result["reasons"][0] == ("reject: listeners preferred the tune in 0 of 7 pairs, the input voice in 6 "
                                        "(1 no difference; p=0.031): they surely preferred the input voice")
        assert result["confidence"] == "listeners, p=0.031: sure"
    # Surely for (6 of 6), the guards keeping it: kept, by the guards, the listeners' line among the reasons.
    result = verdict.decide(kept, listening=listened(6, 0))
    assert (result["decision"], result["decided_by"]) == ("keep", "guards")
    assert result["reasons"][-1] == ("keep: listeners preferred the tune in 6 of 6 pairs, the input voice in 0 (0 no "
                                     "difference; p=0.031)")
    # Preferred, but a guard failed: the guards decide.
    result = verdict.decide(make_report(original=((2.0,), (3.0,))), listening=listened(8, 1, 0.04))
    assert (result["decision"], result["decided_by"]) == ("reject", "guards")
    # Surely preferred where the held-out clips could not judge: the listeners keep it.
    result = verdict.decide(make_report(feedback=None), listening=listened(9, 0, 0.004))
    assert (result["decision"], result["decided_by"]) == ("keep", "listeners")
    # Preferred without being sure, or a tie, guards unable to judge: still not kept.
    assert verdict.decide(make_report(feedback=None), listening=listened(4, 2, 0.69))["decision"] == "reject"
    assert (verdict.decide(make_report(feedback=None), listening=listened(3, 3))["decided_by"]) == "guards"
    # Pooled from several listeners: the line says how many.
    several = dict(listened(0, 9, same=1), listeners=[dict(name="Ava"), dict(name="Bo")])
    assert verdict.decide(kept, listening=several)["reasons"][0] == (
        "reject: listeners preferred the tune in 0 of 10 pairs, the input voice in 9 (1 no difference; p=0.0039; "
        "2 listeners): they surely preferred the input voice")


def plain_outlook(n, val_size):
    """The listening page's figures, worked out plainly: one recording in ten held out (one from four on),
    at most val_size; all k clips agreeing is 2 / 2**k likely; sure below 0.05."""
    def held(m):
        return min(val_size, m // 10 if m // 10 >= 1 else 1 if m >= 4 else 0)
    k = held(n)
    best = min(1.0, 2 / 2 ** k)
    more_to_judge = next(m for m in range(0, 1000) if held(n + m) >= 1) if val_size >= 1 else None
    more_to_be_sure = next(m for m in range(0, 1000) if held(n + m) >= 6) if val_size >= 6 else None
    return k, best, more_to_judge, more_to_be_sure


def test_the_listening_page_says_how_many_recordings_are_held_out_and_how_sure_they_can_be():
    for val_size in (100, 7, 6, 5, 1, 0):
        for n in range(0, 130):
            said = verdict.outlook(n, val_size)
            assert (said["held_out"], said["best_p"], said["to_judge"], said["to_be_sure"]) == \
                plain_outlook(n, val_size), (n, val_size)
            assert said["sure"] == (said["best_p"] < 0.05)
    # The held-out count is the run's own split (clip_data.held_out_indices, which split_validation holds out).
    from voicetune.night import clip_data

    for val_size in (100, 3):
        for n in range(0, 70):
            held = clip_data.held_out_indices([f"audio_{i:03d}.wav" for i in range(n)], val_size, at_least_one=True)
            assert len(held) == verdict.outlook(n, val_size)["held_out"], (n, val_size)
    # In words.
    assert verdict.outlook(3, 100)["line"] == (
        "3 recorded: none held out to judge the tune, so the verdict cannot judge it and would reject it: record 1 "
        "more to have 1 held out (one recording in ten is, at least one from 4); to be sure (p < 0.05) it needs 6 "
        "held-out clips that agree: 57 more recordings")
    assert verdict.outlook(12, 100)["line"] == (
        "12 recorded: 1 held out to judge the tune; with 1 clip the verdict can at best be p = 1; to be sure "
        "(p < 0.05) it needs 6 held-out clips that agree: 48 more recordings")
    assert verdict.outlook(59, 100)["line"] == (
        "59 recorded: 5 held out to judge the tune; with 5 clips the verdict can at best be p = 0.062; to be sure "
        "(p < 0.05) it needs 6 held-out clips that agree: 1 more recording")
    assert verdict.outlook(60, 100)["line"] == (
        "60 recorded: 6 held out to judge the tune; with 6 clips the verdict can at best be p = 0.031: sure if they "
        "agree (p < 0.05)")
    assert verdict.outlook(90, 0)["line"] == (
        "90 recorded: none held out to judge the tune, so the verdict cannot judge it and would reject it: "
        "--val_size 0 holds none out; to be sure (p < 0.05) it needs 6 held-out clips that agree: more than "
        "--val_size 0 holds out")
    assert verdict.outlook(90, 5)["line"].endswith("it needs 6 held-out clips that agree: more than --val_size 5 "
                                                   "holds out")
    # The guards' own word for it: below 6 clips a sign test is never sure.
    assert verdict.SURE_CLIPS == 6
    assert verdict.sureness(dict(clips=5, p_value=0.0625)) == "5 clips: too few to be sure"
    assert verdict.sureness(dict(clips=6, p_value=0.03125)) == "sign test p=0.031: sure"


def test_reconsider_rewrites_the_report_with_the_listeners_verdict(tmp_path):
    report = make_report(status="done")
    report["verdict"] = verdict.decide(report, max_worse_mel=0.05)
    (tmp_path / "report.json").write_text(json.dumps(report), encoding="utf-8")
    result = verdict.reconsider(str(tmp_path), listened(0, 7))
    saved = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert saved["verdict"] == result and result["decided_by"] == "listeners" and result["decision"] == "reject"
    assert saved["listening"]["input_preferred"] == 7
    assert result["tolerances"]["max_worse_mel"] == 0.05  # judged again as it was judged first
    assert [f for f in os.listdir(tmp_path)] == ["report.json"]  # no temp file left
    (tmp_path / "report.json").write_text(json.dumps(make_report()), encoding="utf-8")
    with pytest.raises(run_errors.TrainingError, match="no verdict to reconsider"):
        verdict.reconsider(str(tmp_path), listened(0, 7))


def test_reconsider_writes_report_json_under_a_temporary_name_and_renames_it_in(tmp_path, monkeypatch):
    """A crash or a full disk while the report is rewritten leaves the old report whole, never half of one."""
    report = make_report(status="done")
    report["verdict"] = verdict.decide(report)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report), encoding="utf-8")
    real_open, real_replace = open, os.replace
    written, renamed = [], []

    def watching_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            written.append(os.path.abspath(file))
        return real_open(file, mode, *args, **kwargs)

    def watching_replace(src, dst):
        if os.path.abspath(dst) == str(path):
            with real_open(src, encoding="utf-8") as f:
                renamed.append((os.path.abspath(src), json.load(f)))
            with real_open(dst, encoding="utf-8") as f:
                assert json.load(f) == report  # the old report stays whole until the rename
        return real_replace(src, dst)
    monkeypatch.setattr("builtins.open", watching_open)
    monkeypatch.setattr(os, "replace", watching_replace)
    result = verdict.reconsider(str(tmp_path), listened(1, 6, 0.12))
    assert str(path) not in written
    assert len(renamed) == 1
    temp, content = renamed[0]
    assert temp in written and os.path.dirname(temp) == str(tmp_path)  # one folder: a rename, not a copy
    assert content["verdict"] == result and content["listening"]["input_preferred"] == 6


def test_mms_1b_all_transcribes_with_the_kurmanji_adapter_offline(offline_cache, tmp_path):
    adapters = tiny_mms(offline_cache)
    voice_quality.load_asr.cache_clear()
    processor, model = voice_quality.load_asr(MMS, "kmr-script_latin")
    assert torch.equal(model.lm_head.weight, adapters["kmr-script_latin"]["lm_head.weight"])
    some_adapter = next(k for k in adapters["eng"] if k.startswith("wav2vec2."))
    assert torch.equal(model.state_dict()[some_adapter], adapters["kmr-script_latin"][some_adapter])
    assert processor.tokenizer.convert_ids_to_tokens(7) == "ş"
    wav = str(tmp_path / "a.wav")
    sf.write(wav, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    heard = voice_quality.transcribe([wav], MMS, "kmr-script_latin")[0]
    assert set(heard) <= set("êçşîûa ")
    # The shared flag's default is the voice's language; one the recogniser lacks is one line.
    voice_quality.load_asr.cache_clear()
    with pytest.raises(run_errors.TrainingError, match="--asr_lang xyz: facebook/mms-1b-all has no vocabulary"):
        voice_quality.load_asr(MMS, "xyz")
    voice_quality.load_asr.cache_clear()
    _, english = voice_quality.load_asr(MMS, "eng")
    assert torch.equal(english.lm_head.weight, adapters["eng"]["lm_head.weight"])
    voice_quality.load_asr.cache_clear()


def test_a_language_the_recogniser_lacks_stops_the_night_before_it_trains(offline_cache, prepared_dataset,
                                                                         tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    steps = []
    monkeypatch.setattr(vits_trainer.VitsTrainer, "train_window", lambda *a, **k: steps.append(1))
    tiny_mms(offline_cache)
    voice_quality.load_asr.cache_clear()
    out = str(tmp_path / "run")
    assert train_vits.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--output_dir", out,
                            "--asr_model", MMS, "--asr_lang", "xyz", "--epochs", "1"] + quick(benchmark_samples=0)) == 2
    voice_quality.load_asr.cache_clear()
    assert "--asr_lang xyz: facebook/mms-1b-all has no vocabulary" in one_error_line(capsys.readouterr().err)
    assert steps == [] and not glob.glob(os.path.join(out, "checkpoints", "checkpoint_epoch_*.pt"))
