#!/usr/bin/env bash
# Train the embedded model end to end and export it to longstream/assets/embedded/ (run from the repo root).
# Every stage resumes from its latest checkpoint, so the script can be re-run after an interruption.
#   STAGES="vae vae_long world base tf dmd lora vae_decoder export" (the default: all, in order) picks stages;
#   QUICK=1 runs 2 steps of each stage on 16 clips (a smoke test of the recipe; use a fresh checkout or remove
#     runs/embedded first) and exports to runs/embedded/export_quick;
#   EXPORT=DIR writes the exported files to DIR instead of the package; QUIET=1 hides progress bars;
#   VAE=FILE makes the world stage encode with that VAE instead of vae_long's (e.g.
#     configs/embedded/trained_vae.safetensors, the VAE of stages 1-2 from the 2026-12-02 run; then
#     STAGES="world base tf dmd lora vae_decoder export"; a new world folder needs a new vae_decoder run too:
#     remove runs/embedded/vae_decoder, which would otherwise resume against the old latent statistics);
#   BUDGET=SECONDS ends the whole script within that time: each training stage gets max_seconds = what is left,
#     less RESERVE=25 s per stage still to run (start-up and the last checkpoint took ~21 s a stage on an H200),
#     times its config's max_seconds over the sum of those of the training stages still to run (this overrides
#     a max_seconds in ARGS_<stage>);
#   ARGS_<stage>="--set KEY=VALUE ..." passes overrides to that training stage (e.g. ARGS_dmd="--set max_seconds=200";
#     training stages only; split on spaces, so no value with a space; paths relative to the repository root).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=runs/embedded
cli=(python -m longstream.cli)
quick=()
clips=2000
if [[ "${QUICK:-0}" == 1 ]]; then  # a smoke test never replaces the package's weights
  quick=(--steps 2); clips=16; EXPORT="${EXPORT:-$runs/export_quick}"
fi
quiet=()
if [[ "${QUIET:-0}" == 1 ]]; then quiet=(--quiet); fi
config_seconds() { sed -n 's/^max_seconds: *\([0-9]*\).*/\1/p' "configs/embedded/$1.yaml"; }
budget_args() {  # $1: this stage, then the stages after it; prints "--set max_seconds=S" under BUDGET
  [[ -n "${BUDGET:-}" ]] || return 0
  local mine total=0 later=0 s
  mine=$(config_seconds "$1")
  for s in "$@"; do
    later=$((later + 1))
    case "$s" in vae|vae_long|base|tf|dmd|lora|vae_decoder) total=$((total + $(config_seconds "$s"))) ;; esac
  done
  s=$(( (BUDGET - SECONDS - ${RESERVE:-25} * later) * mine / total ))
  (( s >= 1 )) || { echo "BUDGET $BUDGET s is spent before stage $1" >&2; exit 1; }
  echo "--set max_seconds=$s"
}
weights() { python -c "from longstream.train.trainer import run_weights as w; print(w('$1', ('$2',)))"; }
decoder_vae() {  # the VAE to ship: vae_decoder's when that stage has run, else the world stage's
  if [[ -d "$runs/vae_decoder/checkpoints" ]]; then weights "$runs/vae_decoder" model.safetensors
  else echo "$runs/world/vae.safetensors"; fi
}
stage_args() {  # settings a stage gets besides its config: the VAE stages' fast path on CUDA, vae_decoder's small
  # QUICK clips (its full clips take minutes a step on a CPU)
  if [[ "$1" == vae* ]] && python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "--set vae_autocast=true --set channels_last=true"
  fi
  if [[ "$1" == vae_decoder && "${QUICK:-0}" == 1 ]]; then
    echo "--set batch_size=2 --set clip_frames=17 --set stream_warmup=2"
  fi
}
read -ra stages <<< "${STAGES:-vae vae_long world base tf dmd lora vae_decoder export}"
for i in "${!stages[@]}"; do
  stage=${stages[$i]}
  echo "== $stage ($SECONDS s)"
  extra_var="ARGS_$stage"
  read -ra extra <<< "${!extra_var:-}"
  case "$stage" in
    vae|vae_long|base|tf|dmd|lora|vae_decoder)
      budget_set=$(budget_args "${stages[@]:$i}")  # a failure here stops the script (set -e)
      read -ra budget <<< "$budget_set"
      "${cli[@]}" train "configs/embedded/$stage.yaml" "${quick[@]}" "${quiet[@]}" $(stage_args "$stage") \
        ${extra[@]+"${extra[@]}"} ${budget[@]+"${budget[@]}"} ;;
    world) "${cli[@]}" world "$runs/world" --vae "${VAE:-$(weights "$runs/vae_long" model.safetensors)}" \
      --clips "$clips" --frames 65 "${quiet[@]}" ;;
    export)  # every input is resolved first: a missing one stops the script before anything is written
      transformer=$(weights "$runs/dmd" ema.safetensors)
      lora=$(weights "$runs/lora" lora.safetensors)
      vae=$(decoder_vae)
      python -c "from longstream.assets import export_embedded as e; \
e('$transformer', '$lora', '$vae', '${EXPORT:-longstream/assets/embedded}')" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
