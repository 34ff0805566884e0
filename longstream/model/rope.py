"""3D rotary position embedding of Wan2.x, computed on the fly for arbitrary (growing, fractional) frame positions.

The head dimension splits into a time part and two equal spatial parts (h, w), each rotating pairs of channels
(2i, 2i+1) by angle pos * theta^(-2i/dim). Angles are computed in float64 from the positions themselves rather
than looked up in a fixed table, so a stream never runs out of positions (a 10-minute video included) and the
values equal diffusers' table entries for integer positions. Shots may be separated by a fractional offset.
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to (time, height, width), as in Wan: h = w = 2 * (head_dim // 6), time takes the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
    return torch.outer(positions.to(torch.float64), inv_freq)  # [N, dim / 2]


def rope_cos_sin(
    frame_positions: torch.Tensor, height: int, width: int, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for tokens ordered (frame, h, w): each [F * height * width, head_dim / 2], float32.

    Entry j rotates the channel pair (2j, 2j + 1).
    """
    t_dim, h_dim, w_dim = rope_axis_dims(head_dim)
    device = frame_positions.device
    f = frame_positions.numel()
    ang_t = _axis_angles(frame_positions.reshape(-1), t_dim, theta)
    ang_h = _axis_angles(torch.arange(height, device=device), h_dim, theta)
    ang_w = _axis_angles(torch.arange(width, device=device), w_dim, theta)
    angles = torch.cat(
        [
            ang_t[:, None, None, :].expand(f, height, width, -1),
            ang_h[None, :, None, :].expand(f, height, width, -1),
            ang_w[None, None, :, :].expand(f, height, width, -1),
        ],
        dim=-1,
    ).reshape(f * height * width, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] by per-token cos/sin [S, D/2]; computed in float32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)
