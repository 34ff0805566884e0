"""The embedded model's weights, shipped in the package (`embedded/`), and how a training run becomes them.

Files (written by `export_embedded`, read by `longstream generate --preset embedded`, the default):
- `embedded/transformer.safetensors`: the 4-step distilled AR generator (transformer/1 format, bf16);
- `embedded/lora_2step.safetensors`: the LoRA that turns it into a 2-step generator (`--steps 2` applies it);
- `embedded/vae.safetensors`: the video VAE with its latent statistics (vae/1 format).
The text encoder is `HashTextEncoder` (fixed, no weights). configs/embedded/ holds the recipe that made them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import UsageError
from ..paths import atomic_replace

EMBEDDED = Path(__file__).parent / "embedded"
TRANSFORMER = "transformer.safetensors"
LORA_2STEP = "lora_2step.safetensors"
VAE = "vae.safetensors"


def embedded_file(name: str) -> Path:
    """Path of a shipped file; UsageError when this install lacks it."""
    path = EMBEDDED / name
    if not path.is_file():
        raise UsageError(f"the embedded model file {path} is missing from this install; reinstall longstream or "
                         "pass --checkpoint")
    return path


def export_embedded(transformer: str | Path, lora: str | Path, vae: str | Path, out: str | Path = EMBEDDED) -> None:
    """Write the shipped files from a training run's checkpoints (the transformer cast to bf16); all three inputs
    are checked first, so a missing one writes nothing."""
    from ..model.checkpoints import load_transformer, save_transformer

    missing = [str(f) for f in (transformer, lora, vae) if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"export_embedded: no such file: {', '.join(missing)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_transformer(load_transformer(transformer, dtype=torch.bfloat16), out / TRANSFORMER)
    for src, name in ((lora, LORA_2STEP), (vae, VAE)):
        with atomic_replace(out / name) as tmp:
            shutil.copyfile(src, tmp)
