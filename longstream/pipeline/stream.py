"""StreamingGenerator: chunk-by-chunk AR generation with a KV cache and live prompt switches.

For every chunk of `chunk_frames` latent frames:
  1. denoise fresh noise with the sampler; each model pass reads the cache (sink + recent frames) and writes the
     chunk's own K/V only into the slots the chunk will own;
  2. one more pass on the clean chunk at t = 0 writes its final K/V, and the cache commits the chunk;
  3. the clean latent chunk is yielded at once.
At a shot switch: re-cache (the cached frames' K/V are recomputed under the new prompt), the new shot's RoPE
positions jump by `shot_rope_offset`, and with `multi_shot_sink` the shot's first frames become the sink.
With guidance != 1 a second cache runs the negative prompt (classifier-free guidance).
With a sequence-parallel `shard` (`longstream.parallel.stream_sp.StreamShard`) each rank runs the transformer on
its share of the chunk's frames and caches its share of the heads; every rank yields the same chunks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..config import StreamConfig
from ..model.kv_cache import KVCache, check_attention
from ..model.transformer import CausalWanTransformer, TextContext
from .schedule import FewStepSampler, Sampler

if TYPE_CHECKING:
    from ..parallel.stream_sp import StreamShard


@dataclass(frozen=True)
class ShotPlan:
    """One shot: its text embedding [B, L, text_dim] and its length in chunks."""

    text_emb: torch.Tensor
    chunks: int


@dataclass
class Chunk:
    index: int
    shot: int
    start_frame: int
    latents: torch.Tensor  # [B, C, chunk_frames, h, w], clean


@dataclass(frozen=True)
class FrameLayout:
    """Where each latent frame sits: its shot, RoPE position and whether it may join the sink."""

    stream: StreamConfig
    shot_starts: tuple[int, ...]

    def shot_of(self, frame: int) -> int:
        return bisect.bisect_right(self.shot_starts, frame) - 1

    def position(self, frame: int) -> float:
        return frame + self.shot_of(frame) * self.stream.shot_rope_offset

    def sink_eligible(self, frame: int) -> bool:
        start = self.shot_starts[self.shot_of(frame)] if self.stream.multi_shot_sink else 0
        return frame - start < self.stream.sink_frames


class StreamingGenerator:
    def __init__(
        self,
        model: CausalWanTransformer,
        stream: StreamConfig,
        latent_hw: tuple[int, int],
        *,
        sampler: Sampler | None = None,
        kv_storage: str = "dense",
        attention: str = "bf16",
        shard: "StreamShard | None" = None,
    ) -> None:
        self.model = model
        self.stream = stream
        self.latent_hw = latent_hw
        self.sampler = sampler or FewStepSampler(stream.steps, stream.timestep_shift)
        self.kv_storage = kv_storage
        check_attention(attention, kv_storage)
        self.attention = attention
        self.shard = shard
        cfg = model.config
        if shard is not None:
            shard.frame_range(stream.chunk_frames)  # refuses chunks smaller than the group before any work
        ph, pw = cfg.patch_size[1:]
        if latent_hw[0] % ph or latent_hw[1] % pw:
            raise ValueError(f"latent size {latent_hw} is not divisible by the patch {cfg.patch_size}")
        if cfg.patch_size[0] != 1:
            raise ValueError("the causal engine needs a temporal patch size of 1")
        self.tokens_per_frame = (latent_hw[0] // ph) * (latent_hw[1] // pw)

    def new_cache(self, batch: int) -> KVCache:
        cfg = self.model.config
        return KVCache(
            num_layers=cfg.num_layers, batch=batch,
            heads=self.shard.heads(cfg.num_attention_heads) if self.shard else cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim, tokens_per_frame=self.tokens_per_frame,
            latent_shape=(cfg.in_channels, *self.latent_hw), sink_frames=self.stream.sink_frames,
            window_frames=self.stream.window_frames, dtype=self.model.dtype,
            device=self.model.proj_out.weight.device, storage=self.kv_storage, attention=self.attention,
        )

    def layout(self, shots: Sequence[ShotPlan]) -> FrameLayout:
        starts, frame = [], 0
        for shot in shots:
            starts.append(frame)
            frame += shot.chunks * self.stream.chunk_frames
        return FrameLayout(self.stream, tuple(starts))

    @torch.no_grad()
    def generate(
        self,
        shots: Sequence[ShotPlan],
        *,
        generator: torch.Generator | None = None,
        negative_text_emb: torch.Tensor | None = None,
    ) -> Iterator[Chunk]:
        if not shots:
            raise ValueError("no shots to generate")
        for shot in shots:
            if shot.chunks <= 0:
                raise ValueError(f"every shot needs at least one chunk, got {shot.chunks}")
        guided = self.stream.guidance_scale != 1.0
        if guided and negative_text_emb is None:
            raise ValueError("guidance_scale != 1 needs a negative prompt embedding")
        model, c = self.model, self.stream.chunk_frames
        device = model.proj_out.weight.device
        batch = shots[0].text_emb.shape[0]
        layout = self.layout(shots)
        caches = [self.new_cache(batch)] + ([self.new_cache(batch)] if guided else [])
        negative = model.prepare_text(negative_text_emb.to(device)) if guided else None
        chunk_index = 0
        for shot_index, shot in enumerate(shots):
            texts: list[TextContext] = [model.prepare_text(shot.text_emb.to(device))]
            if guided:
                texts.append(negative)
            if shot_index > 0:  # the negative prompt does not change: its cache stays valid
                model.recache(caches[0], texts[0], self.shard)
            for _ in range(shot.chunks):
                start = chunk_index * c
                frames = list(range(start, start + c))
                positions = [layout.position(f) for f in frames]
                pos = torch.tensor(positions, dtype=torch.float64, device=device)
                for cache in caches:
                    cache.begin_chunk(frames, [layout.sink_eligible(f) for f in frames], positions, chunk_index)

                def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
                    tt = torch.full((batch,), t, device=device)
                    v = self._pass(x, tt, texts[0], caches[0], pos)
                    if not guided:
                        return v
                    v_neg = self._pass(x, tt, texts[1], caches[1], pos)
                    return v_neg + self.stream.guidance_scale * (v - v_neg)

                noise = torch.randn(
                    (batch, model.config.in_channels, c, *self.latent_hw), generator=generator,
                    device=generator.device if generator is not None else "cpu",
                ).to(device=device, dtype=model.dtype)
                clean = self.sampler.sample(velocity, noise, generator)
                zero = torch.zeros(batch, device=device)
                for cache, text in zip(caches, texts):
                    self._pass(clean, zero, text, cache, pos, need_output=False)
                    cache.commit(clean)
                yield Chunk(chunk_index, shot_index, start, clean)
                chunk_index += 1

    def _pass(
        self, x: torch.Tensor, t: torch.Tensor, text: TextContext, cache: KVCache, pos: torch.Tensor,
        need_output: bool = True,
    ) -> torch.Tensor | None:
        """One transformer pass over a chunk; with a shard, over this rank's frames, the velocity gathered."""
        if self.shard is None:
            return self.model.forward_stream(x, t, text, cache, pos, need_output)
        frames = x.shape[2]
        lo, hi = self.shard.frame_range(frames)
        direct = None  # quantized K/V in the cache's own format go into it as they arrive, not re-quantized
        if self.shard.kv_format != "dense" and self.shard.kv_format == self.kv_storage:
            direct = lambda layer, q, kf, vf, mask: cache.attend_fields(layer, q, kf, vf)  # noqa: E731
        exchange = self.shard.attention(lambda layer, q, k, v, mask: cache.attend(layer, q, k, v), frames,
                                        self.tokens_per_frame, fields_inner=direct)
        out = self.model.forward_stream(x[:, :, lo:hi], t, text, exchange, pos[lo:hi], need_output)
        return None if out is None else self.shard.gather(out, frames, dim=2)
