#!/usr/bin/env bash
# The GPU checks of docs/performance.md in priority order, for a short session on a GPU machine: each check has
# its own time limit (together 560 s), so a slow one cannot eat the others' minutes; each log lands in $OUT.
#
#   on a machine with the network, once:  bash benchmarks/gpu_session.sh --prepare [COMMIT]
#       .whl/      the wheels a bare CUDA image lacks (soundfile, librosa, the Cython alignment, speechmos)
#       .against/  COMMIT's tree (default 327845e), the training step bench_train.py --against compares with
#       benchmarks/data/kmr_200_seed0/  the generated clips (espeak-ng need not be on the GPU machine)
#   on the GPU machine, with those three beside the checkout:  OUT=/tmp/gpu_session bash benchmarks/gpu_session.sh
#
# DEVICE=cpu SCALE=smoke runs the same sequence on a CPU at toy sizes (a check of this script itself).
set -u
cd "$(dirname "$0")/.."
CLIPS=200
if [ "${1:-}" = "--prepare" ]; then
    set -e
    commit=${2:-327845e}
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    grep -qx "/.against/" .git/info/exclude 2>/dev/null || echo "/.against/" >> .git/info/exclude
    rm -rf .whl .against && mkdir -p .against
    for wheel in soundfile==0.14.0 cffi pycparser librosa==0.11.0 audioread decorator pooch platformdirs soxr \
            monotonic-alignment-search==0.2.1 speechmos==0.0.1.1; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$wheel"
    done
    git archive "$commit" | tar x -C .against
    .venv/bin/python -c "from benchmarks import common; common.make_dataset(common.dataset_dir($CLIPS), $CLIPS)"
    du -sh .whl .against "benchmarks/data/kmr_${CLIPS}_seed0"
    exit 0
fi

OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ "$DEVICE" = cuda ]; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
if [ "${SCALE:-full}" = smoke ]; then
    SIZE="--model_size tiny --clips 16"; STEPS="--steps 2 --warmup 1"; SMALL=2; LARGE=4; AUTO_STEPS=2
else
    SIZE="--model_size full --clips $CLIPS"; STEPS="--steps 12"; SMALL=8; LARGE=32; AUTO_STEPS=30
fi
AGAINST=$([ -d .against ] && echo "--against .against")

check() {  # check NAME SECONDS COMMAND...: one line of its outcome here, the whole log in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s"
}

$PYTHON -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
# 1. Where a step's time goes, at a launch-bound and a bigger batch.
check profile_b$SMALL 60 $PYTHON benchmarks/profile_step.py $SIZE --device "$DEVICE" --batch_size $SMALL --steps 3
check profile_b$LARGE 60 $PYTHON benchmarks/profile_step.py $SIZE --device "$DEVICE" --batch_size $LARGE --steps 3
# 2. The alignment on the device equals the kernel there, without a host sync.
check alignment 30 $PYTHON -m pytest -q tests/test_alignment.py
# 3. Ours against that older step, and each lever, fp32 and the precision auto picks.
for batch in $SMALL $LARGE; do
    for precision in fp32 auto; do
        check "levers_b${batch}_$precision" 85 $PYTHON benchmarks/bench_train.py --levers --host_syncs $AGAINST \
            $SIZE --device "$DEVICE" --batch_size "$batch" --precision "$precision" $STEPS
    done
done
# 4. The user's card: --batch_size auto under an 8 GiB cap, fp16.
if [ "$DEVICE" = cuda ]; then
    check auto_8gib 70 $PYTHON benchmarks/with_gpu_memory.py 8 train_vits.py \
        --data_dir "benchmarks/data/kmr_${CLIPS}_seed0" --model benchmarks/data/models/full \
        --output_dir /tmp/auto_fp16 --max_steps $AUTO_STEPS --precision fp16 --eval_clips 0
fi
grep -h "^| \|samples/s\|peak" "$OUT"/levers_*.log "$OUT"/auto_8gib.log 2>/dev/null | head -60
