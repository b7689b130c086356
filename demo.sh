#!/usr/bin/env bash
# The README's first set-up command: install, then run the whole job on the built-in example on the CPU.
# A tiny random-initialised voice stands in for MMS so nothing is downloaded; it trains for ~2 minutes
# and ends with example_run/final_model and listening samples in example_run/samples/.
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
    --output_dir example_run/data
.venv/bin/python train_vits.py --model example_run/tiny_model --data_dir example_run/data \
    --output_dir example_run --target_hours 0.033 --device cpu --batch_size 4 --grad_accum 1 \
    --disc_channels 64 --benchmark_samples 8 --lr 1e-3 --warmup_steps 20 --d_warmup_steps 20 "$@"

echo "demo done: voice in example_run/final_model, listening samples in example_run/samples/"
