#!/usr/bin/env bash
# Train the embedded model end to end and export it to longstream/assets/embedded/ (run from the repo root).
# Every stage resumes from its latest checkpoint, so the script can be re-run after an interruption.
#   STAGES="vae vae_long world base tf dmd lora export" (the default: all, in order) picks stages;
#   QUICK=1 runs 2 steps of each stage on 16 clips (a smoke test of the recipe; use a fresh checkout or remove
#     runs/embedded first) and exports to runs/embedded/export_quick;
#   EXPORT=DIR writes the exported files to DIR instead of the package; QUIET=1 hides progress bars;
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
weights() { python -c "from longstream.train.trainer import run_weights as w; print(w('$1', ('$2',)))"; }
for stage in ${STAGES:-vae vae_long world base tf dmd lora export}; do
  echo "== $stage"
  extra_var="ARGS_$stage"
  read -ra extra <<< "${!extra_var:-}"
  case "$stage" in
    vae|vae_long|base|tf|dmd|lora) "${cli[@]}" train "configs/embedded/$stage.yaml" "${quick[@]}" "${quiet[@]}" \
      ${extra[@]+"${extra[@]}"} ;;
    world) "${cli[@]}" world "$runs/world" --vae "$(weights "$runs/vae_long" model.safetensors)" --clips "$clips" --frames 65 "${quiet[@]}" ;;
    export) python -c "from longstream.assets import export_embedded as e; e('$(weights "$runs/dmd" ema.safetensors)', \
'$(weights "$runs/lora" lora.safetensors)', '$runs/world/vae.safetensors', '${EXPORT:-longstream/assets/embedded}')" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
