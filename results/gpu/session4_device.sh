#!/usr/bin/env bash
# One device call of session 4 (2026-11-25, issues 13 and 10), from the repository root on a lent GPU host
# whose Python has torch but neither diffusers nor tokprune:
#
#   bash results/gpu/session4_device.sh            # OUT must name the folder whose files come back
#
# 1. PixArt-Σ-XL-2-1024-MS architecture (random bf16 weights), 1024², 28 steps, CFG: eager / compiled,
#    dense vs CAT-pruned b=0.5 (the GPU scenario). Alone on the GPU, so its timings are clean.
# 2. Then, side by side on the same GPU (neither is timed against the other):
#    - the PixArt-architecture shapes yardstick trained for QUAL_PIX_MIN minutes (packed into $OUT/pix);
#    - the n=64 quality comparison on the SD3 `shapes` yardstick (results/quality/gpu_n64.sh, cut off at
#      its limit; the records so far give a valid partial report).
# Each phase has its own time limit so the whole call ends inside the device's 10-minute command limit,
# and each phase tars its outputs at once (the device returns at most 8 files).
#
# Needs in the checkout: .whl/ with diffusers, polygraphy and importlib_metadata wheels (pure Python).
set -u
: "${OUT:?OUT must be set}"
XL_LIMIT=${XL_LIMIT:-260}
XL_BUDGET=${XL_BUDGET:-150}
PIX_MIN=${PIX_MIN:-4.2}
Q_LIMIT=${Q_LIMIT:-230}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl . || exit 3
REPO=$PWD
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/site/bin/python
nvidia-smi -L
python3 -c "import torch, diffusers, tokprune; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name(), tokprune.__file__)" || exit 3
stamp "installed"

if [ "${SKIP_XL:-0}" != 1 ]; then
mkdir -p /tmp/xl
timeout -k 10 "$XL_LIMIT" python3 results/gpu/scenario_gpu_ready.py --model pixart-sigma-xl --skip graphs \
  --time-budget "$XL_BUDGET" --out /tmp/xl >/tmp/xl/stdout.log 2>&1
stamp "pixart-sigma-xl scenario exit $?"
tail -n 40 /tmp/xl/stdout.log
tar -cf "$OUT/xl.tar" -C /tmp xl
fi
# From outside the checkout: its tokprune/ folder holds only the core package and would shadow the install.
cd /tmp

(
  python3 -m tokprune.yardstick.train --arch pixart --device cuda --minutes "$PIX_MIN" --out /tmp/pix \
    --pack-to "$OUT/pix" >/tmp/pixtrain.log 2>&1
  echo "train exit $?" >>/tmp/pixtrain.log
) &
WORK=/tmp/q64 bash "$REPO/results/quality/gpu_n64.sh" "$Q_LIMIT" /tmp/qout >/tmp/q64.log 2>&1
stamp "quality done"
wait
stamp "training done"
grep -v -e clean_caption -e beautifulsoup -e 'restart your runtime' -e '^$' /tmp/pixtrain.log | tail -n 25
tail -n 15 /tmp/q64.log
mkdir -p /tmp/qout
cp /tmp/pixtrain.log /tmp/q64.log /tmp/qout/ 2>/dev/null
tar -cf "$OUT/small.tar" -C /tmp qout
ls -l "$OUT" "$OUT/pix" 2>/dev/null
stamp "end"
