#!/usr/bin/env bash
# The open speed work's device checks in one call, from the repository root on the GPU machine: the GPU tests;
# the attention, GEMM and VAE-decode benchmarks; the DiT with dense and fp8 KV (~8 minutes on an H200; each step
# has a time limit, and STEPS picks steps where a call's limit is shorter). Logs and JSON in $OUT (the device
# tool's output folder) or bench/results/gpu_checks; the exit status is 1 if a step failed. Wheels the machine
# lacks (diffusers, av) are installed from .whl/ when it is there (README, "Set up").
set -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu_checks}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
rc=0
# STEPS="gemm e2e_kv" runs only those; "video" (a 64-s video at 2 steps with the FP8 decoder, ~4 min) and
# "train_step" (the embedded model's base and tf steps, ~1 min) only when named
steps=" ${STEPS:-gpu_tests kv_attention gemm fp8_conv vae_decode e2e_kv} "
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, remember a failure
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  [[ $steps == *" $name "* ]] || return 0
  timeout "$limit" "$@" > "$out/$name.log" 2>&1 || { rc=1; echo "$name FAILED (see $out/$name.log)"; }
  tail -12 "$out/$name.log"
  echo "== $name: $((SECONDS - start)) s"
}
step gpu_tests 240 python3 -m pytest -q -m gpu tests/
step kv_attention 90 python3 bench/kv_attention.py --out "$out/kv_attention.json"
step gemm 120 python3 bench/gemm.py --shapes 14080x14336x3072,7040x3072x3072 --out "$out/gemm.json"
step fp8_conv 150 python3 bench/fp8_conv.py --out "$out/fp8_conv.json"
step vae_decode 120 python3 bench/vae_decode.py --layers fused-cl,fused-cl-fp8 --cudnn-benchmark off \
  --json "$out/vae_decode.json"
step video 300 python3 bench/video_e2e.py --preset wan2.2-ti2v-5b --seconds 64 --steps 2 --linear fp8 \
  --vae-dtype fp8 --json "$out/video_e2e.json"
step train_step 120 python3 bench/train_step.py --stages base,tf --batch 64,128,256 --warmup 5 --steps 10 \
  --json "$out/train_step.json"
step e2e_kv 240 python3 -m longstream.cli bench e2e --steps 4,2 --linear fp8 --kv-cache dense,fp8 --no-vae --quiet \
  --json "$out/e2e_kv.json"
exit $rc
