"""Training objectives on latent clips [B, C, F, h, w] (model space, i.e. VAE-normalized).

Flow matching (Wan's convention): x_t = (1 - s) x0 + s noise, target velocity noise - x0, timestep 1000 s, with
s drawn uniformly and warped by the timestep shift.

- `flow_matching_loss`: bidirectional pretraining (one s per clip, full attention): makes the base diffusion model.
- `teacher_forcing_loss`: AR teacher forcing. The sequence is [clean frames, noisy frames] with an independent s
  per chunk of the noisy copy; the teacher-forcing mask lets a noisy chunk see its own noisy frames and the clean
  frames of earlier chunks (`model.attention.teacher_forcing_mask`); both copies share RoPE positions. The loss
  covers the noisy frames only. Starting from a bidirectional model, this tunes it directly into a causal one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.attention import teacher_forcing_mask
from ..model.transformer import CausalWanTransformer
from ..pipeline.schedule import shift_sigma


def sample_sigmas(shape: tuple[int, ...], shift: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """Noise levels s in (0, 1]: uniform, then shifted (more weight on high noise for shift > 1)."""
    u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else "cpu")
    u = 1e-3 + (1 - 1e-3) * u
    return shift_sigma(u, shift).to(device)


def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randn(like.shape, generator=generator, device=device).to(like)


def flow_matching_loss(
    model: CausalWanTransformer, x0: torch.Tensor, text_emb: torch.Tensor, *, shift: float = 5.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    b = x0.shape[0]
    s = sample_sigmas((b,), shift, generator, x0.device).to(x0.dtype)
    noise = _noise(x0, generator)
    sb = s.view(b, 1, 1, 1, 1)
    x_t = (1 - sb) * x0 + sb * noise
    pred = model(x_t, 1000.0 * s, text_emb, causal=False)
    return F.mse_loss(pred.float(), (noise - x0).float())


def teacher_forcing_loss(
    model: CausalWanTransformer, x0: torch.Tensor, text_emb: torch.Tensor, *, chunk_frames: int,
    shift: float = 5.0, generator: torch.Generator | None = None,
) -> torch.Tensor:
    b, _, f = x0.shape[:3]
    if f % chunk_frames:
        raise ValueError(f"clip of {f} latent frames is not a whole number of {chunk_frames}-frame chunks")
    chunks = f // chunk_frames
    s_chunk = sample_sigmas((b, chunks), shift, generator, x0.device).to(x0.dtype)
    s = s_chunk.repeat_interleave(chunk_frames, dim=1)  # [B, F]
    noise = _noise(x0, generator)
    sb = s.view(b, 1, f, 1, 1)
    noisy = (1 - sb) * x0 + sb * noise
    seq = torch.cat([x0, noisy], dim=2)
    t = torch.cat([torch.zeros_like(s), 1000.0 * s], dim=1)
    positions = torch.arange(f, device=x0.device).repeat(2)
    mask = teacher_forcing_mask(f, chunk_frames)  # on the CPU: the model groups its rows once per shape
    pred = model(seq, t, text_emb, causal=True, frame_positions=positions, frame_mask=mask)
    return F.mse_loss(pred[:, :, f:].float(), (noise - x0).float())
