"""Smoke test of benchmarks/bench_train.py: a few clips, two steps of each loop, tiny model, CPU."""

import math
import re

import pytest

from benchmarks import bench_train


def test_bench_train_prints_table_and_speedup(tmp_path, capsys):
    bench_train.main(["--clips", "4", "--steps", "2", "--warmup", "0", "--batch_size", "2", "--model_size", "tiny",
                      "--device", "cpu", "--num_workers", "1", "--data_dir", str(tmp_path / "data")])
    out = capsys.readouterr().out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert re.fullmatch(r"speedup \d+\.\dx", lines[-1]), lines[-1]
    assert float(lines[-1].split()[1][:-1]) > 0
    assert "| loop | precision | samples/s | audio s/s | data wait |" in out
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith(("| naive", "| ours"))}
    assert set(rows) == {"naive", "ours"}
    for row in rows.values():
        cells = [c.strip() for c in row.strip("|").split("|")]
        samples_s, audio_s, wait = float(cells[2]), float(cells[3]), float(cells[4].rstrip("%"))
        assert math.isfinite(samples_s) and samples_s > 0
        assert math.isfinite(audio_s) and audio_s > 0
        assert 0 <= wait <= 100
        assert re.fullmatch(r"\d+(\.\d+)? (MiB|GiB)", cells[-1]) and float(cells[-1].split()[0]) > 0


def test_bench_train_levers_time_every_variant_and_change_no_loss(tmp_path, capsys):
    times, losses = bench_train.main(["--levers", "--clips", "4", "--steps", "2", "--warmup", "0", "--batch_size", "2",
                                      "--model_size", "tiny", "--device", "cpu", "--num_workers", "1",
                                      "--data_dir", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert list(times) == ["ours", "fused AdamW off", "critic on the real rows with a graph"]
    assert all(len(t) == 2 and all(s > 0 for s in t) for t in times.values())
    # Each speed-up is only one: switched off, the same weights and batches give the same losses.
    for name in times:
        assert losses[name] == pytest.approx(losses["ours"], rel=1e-4), name
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split("|")[1].strip() for row in rows] == list(times)
    assert all(re.fullmatch(r"\d+\.\d\dx", row.split("|")[4].strip()) for row in rows)


def test_bench_quality_quick_prints_a_table_quality_lines_and_a_plot(tmp_path, capsys):
    from benchmarks import bench_quality

    plot = tmp_path / "quality.png"
    rows = bench_quality.main(["--quick", "--data_dir", str(tmp_path / "data"), "--clips", "20", "--base_steps", "2",
                               "--epochs", "1", "--eval_clips", "1", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert sorted(rows) == [0, 1]
    assert "| epoch | step | new MCD dB | new dur ratio |" in out
    lines = [line for line in out.splitlines() if line.startswith("quality: epoch ")]
    assert [line.split()[2] for line in lines] == ["0", "1"]
    for line in lines:
        values = dict(zip(line.split()[3::2], map(float, line.split()[4::2])))
        assert set(values) == {"step"} | {f"{v}_{k}" for v in ("new", "old") for k in
                                          ("mcd", "dur_ratio", "dur_ratio_std", "dnsmos_ovrl", "val_mel")}
        assert all(math.isfinite(v) for v in values.values())
    # The fine-tune moved the voice: its epoch-1 numbers are train_vits.py's own, not the base's again.
    assert rows[1]["new"] != rows[0]["new"]
    assert plot.stat().st_size > 0


def test_bench_quality_speakers_case_measures_each_voice_by_each_speaker(tmp_path, capsys):
    from benchmarks import bench_quality

    results = bench_quality.main(["--quick", "--case", "speakers", "--data_dir", str(tmp_path / "data"), "--clips",
                                  "20", "--base_steps", "2", "--epochs", "1", "--eval_clips", "1"])
    voices = ["new", "old"]
    assert sorted(results["base"]) == sorted(results["pooled"]) == [(None, v) for v in voices]
    assert sorted(results["2"]) == [(s, v) for s in voices for v in voices]
    # The two speakers of the 2-speaker voice speak the same clip differently.
    assert results["2"][("new", "old")] != results["2"][("old", "old")]
    assert all(math.isfinite(x) for scores in results.values() for pair in scores.values() for x in pair)
    out = capsys.readouterr().out
    assert "| 2-speaker, speaker old | old (ku/165/45) |" in out
    assert len([line for line in out.splitlines() if line.startswith("quality: speakers ")]) == 8


def test_bench_speak_times_torch_onnxruntime_and_sherpa_onnx(tmp_path, capsys):
    from benchmarks import bench_speak

    rows = bench_speak.main(["--model_size", "tiny", "--min_seconds", "0", "--max_seconds", "100", "--sentences", "2",
                             "--repeats", "1", "--threads", "1,2", "--out_dir", str(tmp_path)])
    assert [(name, threads) for name, threads, _ in rows] == [
        (engine, threads) for threads in (1, 2) for engine in ("torch", "onnxruntime", "sherpa-onnx")]
    assert all(math.isfinite(rtf) and rtf > 0 for _, _, rtf in rows)
    out = capsys.readouterr().out
    assert "| engine | threads | real-time factor | faster than real time |" in out
    assert sum(line.startswith(("| torch |", "| onnxruntime |", "| sherpa-onnx |")) for line in out.splitlines()) == 6
