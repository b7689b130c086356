"""Smoke test of benchmarks/bench_train.py: a few clips, two steps of each loop, tiny model, CPU."""

import math
import re

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
