"""Per-frame round-trip error of a VAE deep into a stream: `python tools/vae_probe.py VAE.safetensors [--clips 12]
[--frames 129] [--every 8] [--json OUT.json]`.

World clips of random scenes (seeded) are encoded whole and stream-decoded (4 latent frames a call), as
`longstream generate` decodes; the table shows each listed frame's mean absolute error (of [-1, 1] pixels), mean
and worst over the clips. A VAE that drifts shows it as error growing with the frame index; the drift test
(`tests/test_embedded_recipe.py`) bounds the shipped VAE's worst frame on two fixed clips by 0.15.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from longstream.devices import resolve_device
from longstream.eval.world_eval import round_trip_error
from longstream.train.world import random_scene
from longstream.vae.checkpoints import load_vae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vae", help="VAE file (a vae run's model.safetensors or longstream/assets/embedded/vae.safetensors)")
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--frames", type=int, default=129, help="frames per clip, 1 + 4k (default 129)")
    p.add_argument("--every", type=int, default=8, help="show every n-th frame (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the per-frame errors here")
    a = p.parse_args()
    if a.frames % 4 != 1:
        p.error(f"--frames must be 1 + 4k, got {a.frames}")
    rng = random.Random(a.seed)
    scenes = [random_scene(rng) for _ in range(a.clips)]
    vae = load_vae(a.vae, device=resolve_device("auto"))
    errors = round_trip_error(vae, scenes, a.frames, seed=a.seed)
    mean, worst = errors.mean(0), errors.max(0).values
    shown = list(range(0, a.frames, a.every))
    print("frame " + " ".join(f"{f:6d}" for f in shown))
    print("mean  " + " ".join(f"{float(mean[f]):6.3f}" for f in shown))
    print("worst " + " ".join(f"{float(worst[f]):6.3f}" for f in shown))
    print(f"worst frame overall {float(worst.max()):.3f} (frame {int(worst.argmax())})")
    if a.json:
        Path(a.json).write_text(json.dumps({"vae": a.vae, "scenes": [s.prompt for s in scenes],
                                            "per_frame_error": errors.tolist()}))


if __name__ == "__main__":
    main()
