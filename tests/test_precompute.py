"""Latent precomputation: world clips -> a latent dataset, equal to whole-clip encoding, resumable."""

import pytest
import torch

from longstream.train.data import LatentClipDataset
from longstream.train.precompute import done_clips, encode_clips, latent_start
from longstream.train.world import sample_clip
from longstream.vae import build_vae, encode_whole


def clips(n, start=0):
    for i in range(start, start + n):
        video, shots = sample_clip(i, 21, 32, shots=2)  # 21 frames = 6 latents; shots at frames 0 and 11
        yield f"clip_{i:03d}", video, shots


def test_latent_start():
    assert [latent_start(a) for a in (0, 1, 4, 5, 8, 9, 11)] == [0, 1, 2, 2, 3, 3, 4]


def test_encode_clips_matches_whole_clip_and_resumes(tmp_path):
    vae = build_vae("test-wan2.1", seed=0)
    root = tmp_path / "latents"

    def interrupted():
        yield from clips(2)
        raise KeyboardInterrupt("stopped after two clips")

    with pytest.raises(KeyboardInterrupt):
        encode_clips(interrupted(), vae, root, chunk_latents=2, progress=False)
    assert len(done_clips(root)) == 2
    assert encode_clips(clips(3), vae, root, chunk_latents=2, progress=False) == 1  # only the missing clip
    data = LatentClipDataset(root, clip_frames=2, channels=16)
    assert len(done_clips(root)) == 3 and len(data) == 9  # windows of 2: two in the 4-frame shot, one in the 2-frame one
    name, video, shots = next(clips(1))
    first = next(i for i, e in enumerate(data.examples) if e.file.name == f"{name}.safetensors")
    latents, prompt = data.load(first)
    whole = encode_whole(vae, video[None], normalized=True)[0]
    assert torch.allclose(latents, whole[:, :2], rtol=1e-5, atol=1e-6)
    assert prompt == shots[0][0]
    index = (root / "clips.jsonl").read_text().splitlines()
    assert '"start": 0, "end": 4' in index[0] and '"start": 4, "end": 6' in index[0]
