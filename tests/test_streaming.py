"""Streaming generation (KV cache, ring eviction, sink, re-cache) against masked whole-sequence forwards.

The reference re-runs, for every chunk, one masked forward over every frame that matters (clean history at t=0
plus the noisy chunk), with a visibility mask built here from first principles: a chunk ending at frame e sees
the last `sink` sink-eligible frames before e and the last `window - sink` other frames before e (its own chunk
included). After a shot switch, the frames cached at the switch are recomputed under the new prompt, each
seeing the cached frames of its own and earlier chunks.
"""

import pytest
import torch

from longstream.config import StreamConfig
from longstream.model.attention import sink_window_mask
from longstream.model.transformer import CausalWanTransformer
from longstream.config import TransformerConfig
from longstream.pipeline.schedule import FewStepSampler
from longstream.pipeline.stream import ShotPlan, StreamingGenerator

LATENT_HW = (4, 6)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_model(seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        num_attention_heads=3, attention_head_dim=12, num_layers=3, ffn_dim=48, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32,
    )
    model = CausalWanTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.25)
    return model


class Oracle:
    """Frame visibility of a multi-shot stream, written independently of the engine."""

    def __init__(self, stream: StreamConfig, shot_starts):
        self.s, self.starts = stream, list(shot_starts)

    def shot(self, f):
        return max(i for i, s in enumerate(self.starts) if f >= s)

    def eligible(self, f):
        first = self.starts[self.shot(f)] if self.s.multi_shot_sink else 0
        return f - first < self.s.sink_frames

    def position(self, f):
        return f + self.shot(f) * self.s.shot_rope_offset

    def visible_before(self, end):
        elig = [f for f in range(end) if self.eligible(f)]
        other = [f for f in range(end) if not self.eligible(f)]
        keep = elig[max(0, len(elig) - self.s.sink_frames) :] if self.s.sink_frames else []
        recent = other[max(0, len(other) - (self.s.window_frames - self.s.sink_frames)) :]
        return set(keep) | set(recent)


def reference_rollout(model, stream, shots, texts, seed, self_attention=None):
    """Latents of every chunk, from masked whole-sequence forwards only."""
    c = stream.chunk_frames
    starts = [sum(n for n, _ in shots[:i]) * c for i in range(len(shots))]
    oracle = Oracle(stream, starts)
    sampler = FewStepSampler(stream.steps, stream.timestep_shift)
    gen = torch.Generator().manual_seed(seed)
    latents = {}  # frame -> [B, C, h, w]
    out = []
    chunk = 0
    for shot_index, (n_chunks, _) in enumerate(shots):
        text = texts[shot_index]
        shot_start = starts[shot_index]
        recached = sorted(oracle.visible_before(shot_start)) if shot_index else []
        for _ in range(n_chunks):
            start, end = chunk * c, chunk * c + c
            history = recached + list(range(shot_start, start))
            frames = history + list(range(start, end))
            chunk_of = [f // c for f in frames]
            mask = torch.zeros(len(frames), len(frames), dtype=torch.bool)
            for i, q in enumerate(frames):
                if q in recached:  # re-cache visibility: cached frames of own and earlier chunks
                    mask[i] = torch.tensor([k in recached and chunk_of[j] <= chunk_of[i] for j, k in enumerate(frames)])
                else:
                    q_end = (q // c + 1) * c
                    vis = oracle.visible_before(q_end)
                    mask[i] = torch.tensor([k in vis and k < q_end for k in frames])
            positions = torch.tensor([oracle.position(f) for f in frames], dtype=torch.float64)
            noise = torch.randn((1, 4, c, *LATENT_HW), generator=gen)
            hist = torch.stack([latents[f] for f in history], dim=2) if history else noise[:, :, :0]

            def velocity(x, t):
                seq = torch.cat([hist, x], dim=2)
                ts = torch.tensor([[0.0] * len(history) + [t] * c])
                y = model(seq, ts, text, causal=True, frame_positions=positions, frame_mask=mask,
                          self_attention=self_attention)
                return y[:, :, len(history) :]

            clean = sampler.sample(velocity, noise, gen)
            for i, f in enumerate(range(start, end)):
                latents[f] = clean[:, :, i]
            out.append(clean)
            chunk += 1
    return torch.cat(out, dim=2)


def stream_rollout(model, stream, shots, texts, seed, storage="dense"):
    gen = StreamingGenerator(model, stream, LATENT_HW, kv_storage=storage)
    plans = [ShotPlan(texts[i], n) for i, (n, _) in enumerate(shots)]
    chunks = list(gen.generate(plans, generator=torch.Generator().manual_seed(seed)))
    return torch.cat([ch.latents for ch in chunks], dim=2)


@pytest.mark.parametrize(
    "stream",
    [
        StreamConfig(chunk_frames=2, window_frames=6, sink_frames=2, steps=2),  # ring of 4: wraps at chunk 3
        StreamConfig(chunk_frames=2, window_frames=7, sink_frames=1, steps=3),  # ring of 6, not a chunk multiple
        StreamConfig(chunk_frames=3, window_frames=6, sink_frames=0, steps=2),  # no sink
    ],
)
def test_single_shot_stream_equals_masked_forward(stream):
    model = make_model()
    text = torch.randn(1, 5, 16)
    shots = [(6, "a")]
    with torch.no_grad():
        ref = reference_rollout(model, stream, shots, [text], seed=3)
        got = stream_rollout(model, stream, shots, [text], seed=3)
    assert got.shape == (1, 4, 6 * stream.chunk_frames, *LATENT_HW)
    assert rel(got, ref) < 1e-5


def test_library_sink_window_mask_matches_oracle():
    stream = StreamConfig(chunk_frames=2, window_frames=7, sink_frames=1)
    oracle = Oracle(stream, [0])
    mask = sink_window_mask(12, 2, 7, 1)
    for q in range(12):
        q_end = (q // 2 + 1) * 2
        vis = oracle.visible_before(q_end)
        assert mask[q].tolist() == [k in vis for k in range(12)]


@pytest.mark.parametrize("multi_shot_sink", [True, False])
def test_two_shot_stream_with_recache_equals_masked_forward(multi_shot_sink):
    stream = StreamConfig(
        chunk_frames=2, window_frames=6, sink_frames=2, steps=2, multi_shot_sink=multi_shot_sink,
        shot_rope_offset=2.5,
    )
    model = make_model(1)
    texts = [torch.randn(1, 5, 16), torch.randn(1, 7, 16)]
    shots = [(3, "a"), (3, "b")]
    with torch.no_grad():
        ref = reference_rollout(model, stream, shots, texts, seed=5)
        got = stream_rollout(model, stream, shots, texts, seed=5)
        # the switch matters: without re-cache the second shot differs
        plain = reference_rollout(model, stream, [(6, "a")], texts[:1], seed=5)
    assert rel(got, ref) < 1e-5
    assert rel(got[:, :, 6:], plain[:, :, 6:]) > 1e-2


def test_long_stream_keeps_cache_size_flat():
    """Sixty chunks (ten times the window) run with a constant cache and finite output."""
    stream = StreamConfig(chunk_frames=2, window_frames=6, sink_frames=2, steps=1)
    model = make_model()
    gen = StreamingGenerator(model, stream, LATENT_HW)
    cache_sizes = []
    original = gen.new_cache

    def spy(batch):
        cache = original(batch)
        cache_sizes.append(cache.nbytes())
        spy.cache = cache
        return cache

    gen.new_cache = spy
    with torch.no_grad():
        chunks = list(gen.generate([ShotPlan(torch.randn(1, 3, 16), 60)], generator=torch.Generator()))
    assert len(chunks) == 60 and len(cache_sizes) == 1
    assert chunks[-1].start_frame == 118
    cache = spy.cache
    assert cache.nbytes() == cache_sizes[0]
    assert sum(s is not None for s in cache.slots) == stream.window_frames  # full, never more
    assert sorted(s.frame for s in cache.slots)[-4:] == [116, 117, 118, 119]
    assert all(torch.isfinite(ch.latents).all() for ch in chunks)


def test_guided_stream_runs_two_caches():
    stream = StreamConfig(chunk_frames=2, window_frames=6, sink_frames=2, steps=2, guidance_scale=3.0)
    model = make_model()
    gen = StreamingGenerator(model, stream, LATENT_HW)
    made = []
    original = gen.new_cache
    gen.new_cache = lambda batch: made.append(original(batch)) or made[-1]
    text, neg = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    with torch.no_grad():
        guided = torch.cat([c.latents for c in gen.generate(
            [ShotPlan(text, 2)], generator=torch.Generator().manual_seed(0), negative_text_emb=neg)], 2)
        plain = stream_rollout(model, StreamConfig(chunk_frames=2, window_frames=6, sink_frames=2, steps=2),
                               [(2, "a")], [text], seed=0)
    assert rel(guided, plain) > 1e-2
    assert len(made) == 2 and all(sum(s is not None for s in c.slots) == 4 for c in made)
    with pytest.raises(ValueError, match="negative"):
        next(gen.generate([ShotPlan(text, 1)]))


def frame_fake_quantizer(kind, tokens_per_frame):
    """Self-attention whose K and V go through the cache's number format: one scale per (batch, head, frame)."""
    from longstream.model.attention import attention
    from longstream.quant import nvfp4

    def fake(x):
        b, h, s, d = x.shape
        frames = x.reshape(b, h, s // tokens_per_frame, tokens_per_frame, d)
        out = torch.empty_like(frames)
        for i in range(b):
            for j in range(h):
                for f in range(frames.shape[2]):
                    block = frames[i, j, f].float()
                    amax = block.abs().max()
                    if kind == "fp8":
                        scale = amax / 448
                        out[i, j, f] = (block / scale).to(torch.float8_e4m3fn).float() * scale
                    else:
                        out[i, j, f] = nvfp4.fake_quantize(block, global_scale=amax / 2688)
        return out.reshape(b, h, s, d)

    def self_attention(layer, q, k, v, mask):
        return attention(q, fake(k), fake(v), mask)

    return self_attention


@pytest.mark.parametrize("kind", ["fp8", "nvfp4"])
def test_quantized_cache_stream_equals_masked_forward_with_quantized_kv(kind):
    stream = StreamConfig(chunk_frames=2, window_frames=6, sink_frames=2, steps=2, shot_rope_offset=2.0)
    torch.manual_seed(2)
    cfg = TransformerConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=48,
                            in_channels=4, out_channels=4, text_dim=16, freq_dim=32)
    model = CausalWanTransformer(cfg).eval().double()  # float64: no rounding-boundary flips between the paths
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.25)
    texts = [torch.randn(1, 5, 16), torch.randn(1, 4, 16)]
    shots = [(3, "a"), (2, "b")]
    tokens = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
    with torch.no_grad():
        ref = reference_rollout(model, stream, shots, texts, 11, frame_fake_quantizer(kind, tokens))
        got = stream_rollout(model, stream, shots, texts, 11, storage=kind)
        dense = stream_rollout(model, stream, shots, texts, 11)
    assert rel(got, ref) < 1e-5
    assert rel(got, dense) > 1e-4  # the format is really in the loop
