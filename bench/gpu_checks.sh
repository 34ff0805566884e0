#!/usr/bin/env bash
# The open speed work's device checks in one call (~8 minutes on an H200), from the repository root on the GPU
# machine: the GPU tests; the attention, GEMM and VAE-decode benchmarks; the DiT with dense and fp8 KV. Results in
# $OUT (the device tool's output folder) or bench/results/gpu_checks. Wheels the machine lacks (diffusers, av) are
# installed from .whl/ when it is there (README, "Set up").
set -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu_checks}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$out/gpu_tests.log" | tail -8
python3 bench/kv_attention.py --out "$out/kv_attention.json" 2>&1 | tee "$out/kv_attention.log"
python3 bench/gemm.py --shapes 14080x14336x3072,7040x3072x3072 --out "$out/gemm.json" 2>&1 | tail -12
python3 bench/vae_decode.py --layers fused-cl --cudnn-benchmark off --json "$out/vae_decode.json" 2>&1 \
  | tee "$out/vae_decode.log"
python3 -m longstream.cli bench e2e --steps 4,2 --linear fp8 --kv-cache dense,fp8 --no-vae --quiet \
  --json "$out/e2e_kv.json" 2>&1 | tail -12
