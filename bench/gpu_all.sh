#!/usr/bin/env bash
# Everything that needs the GPU, in one call: GPU tests, kernel bench, throughput (W1), batch-1 latency,
# LoRA throughput, KV offload.
# Usage (repo root, on the GPU machine): bash bench/gpu_all.sh [tests|kernels|sweep|gemv|throughput|latency|profile|profile_lora|persistent|megakernel|lora|offload ...]
set -uo pipefail
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The repository root is the package `kvserve`.
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/kvserve && export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=${*:-tests kernels throughput latency}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for s in $steps; do
  echo "=== $s"
  case $s in
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_path.py tests/test_lora_kernels.py \
             2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    kernels) python3 bench/kernels.py 2>&1 | tee "$OUT/kernels.log" | grep -v Warn | tail -6 ;;
    sweep) python3 bench/kernels.py --sweep 2>&1 | tee "$OUT/sweep.log" | grep -v Warn | tail -6 ;;
    gemv) python3 bench/gemv.py 2>&1 | tee "$OUT/gemv.log" ;;
    lora) python3 bench/lora_throughput.py 2>&1 | tee "$OUT/lora.log" | grep -v Warn | tail -4 ;;
    offload) python3 bench/offload.py 2>&1 | tee "$OUT/offload.log" | grep -v Warn | tail -8 ;;
    throughput) python3 bench/throughput.py ${THROUGHPUT_ARGS:-} 2>&1 | tee "$OUT/throughput.log" | grep -v Warning | tail -8 ;;
    latency) python3 bench/latency.py 2>&1 | tee "$OUT/latency.log" | tail -4 ;;
    profile) python3 bench/profile_decode.py ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" | grep -v Warn ;;
    profile_lora) python3 bench/profile_decode.py --batch 256 --lora 8 2>&1 | tee "$OUT/profile_lora.log" | grep -v Warn ;;
    persistent) python3 bench/persistent_stream.py 2>&1 | tee "$OUT/persistent.log" | grep -v Warn ;;
    megakernel) python3 bench/megakernel_layers.py 2>&1 | tee "$OUT/megakernel.log" ;;
  esac
done
