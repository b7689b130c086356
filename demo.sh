#!/usr/bin/env bash
# The README's first set-up command: install, then run the whole job on the built-in example on the CPU.
# A tiny random-initialised voice stands in for MMS so nothing is downloaded. It trains a fixed number of
# steps (not a time budget, so it learns even on a slow or busy machine; validation and voice-quality
# measures run after each of its 25 epochs) and ends with example_run/final_model, listening samples in
# example_run/samples/ and the voice-quality measures of its first and last epoch. example_run/ is laid out as
# the README's real night lays out training/: the prepared data and the night's run in one folder, the home
# of everything the mornings after add (the listening sessions, the feedback, the tunes, the voice in use).
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch first and pinned: the local CPU wheel, never a multi-GB CUDA download.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -r requirements.txt

.venv/bin/python examples/tiny_model.py --output_dir example_run/tiny_model
.venv/bin/python prepare_data.py --input examples/cv-kmr-sample --model example_run/tiny_model \
    --output_dir example_run
# One thread: a 0.2M-parameter voice gains nothing from a second one, and on a machine that is busy with
# anything else two threads wait on each other in every op (150 steps: 4.5 min with two, 1.8 min with one,
# measured while another process kept one core busy).
OMP_NUM_THREADS=1 .venv/bin/python train_vits.py --model example_run/tiny_model --data_dir example_run \
    --output_dir example_run --overwrite --max_steps 150 --benchmark_samples 0 --device cpu --batch_size 4 --grad_accum 1 \
    --disc_channels 64 --lr 1e-3 --warmup_steps 20 --d_warmup_steps 20 --eval_clips 2 "$@"

# Before/after: validation and voice quality (README, train_vits.py) after the first epoch, which only
# trains the fresh discriminator (the voice is still the untrained one), and after the last.
.venv/bin/python - <<'PY'
import json
with open("example_run/metrics.jsonl", encoding="utf-8") as f:
    epochs = [r for r in map(json.loads, f) if "val_mel" in r]
epochs = epochs[max(i for i, r in enumerate(epochs) if r["epoch"] == 1):]  # this run's (the file is appended to)
keys = ["val_mel", "eval_mcd", "eval_dur_ratio", "eval_dnsmos_ovrl"]
for when, r in (("before", epochs[0]), ("after", epochs[-1])):
    print(f"quality {when} (epoch {r['epoch']}, step {r['step']}): "
          + " | ".join(f"{k} {r[k]:.3f}" for k in keys if k in r))
PY

# What to run next, each line as it runs here (run_files writes every printed command).
.venv/bin/python - <<'PY'
from voicetune.common import run_files
voice, home = "example_run/final_model", "example_run"
print("demo done: voice in example_run/final_model, listening samples in example_run/samples/, the run's page in "
      "example_run/report.html. The morning after, in this folder:")
print(f"  1. hear it sentence by sentence, record corrections: "
      f"{run_files.listen_command(run_files.sentences_file(), voice, home)}")
print(f"  2. tune it on them: {run_files.tune_command(voice, home)}")
print("  3. the tune ends with its blind comparison (--compare) and promote (--promote) lines for its folder "
      "example_run/feedback_models/<date-time>")
print(f"  4. after a promote, the voice before it again: {run_files.rollback_command(home)}")
PY
