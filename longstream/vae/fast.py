"""Faster Wan VAE inference with the same math: `accelerate(vae)` swaps two layer classes in place.

Measured on 2 CPU cores (the tiny VAE decoding 128x128 video), two things took 85% of the time:

- `WanRMS_norm` calls `F.normalize` over the channel dim of a 5-D tensor, a slow strided reduction on CPU;
  `FastRMSNorm` computes x * rsqrt(sum x^2) over channels (equal up to float rounding; eps 1e-12 as before).
- PyTorch routes a conv3d to its slow native kernel instead of oneDNN when batch * channels * time * height is
  small (a size heuristic in ATen's `use_mkldnn`), which streaming decode always hits; `FastCausalConv3d` calls
  the oneDNN convolution directly for float32 CPU tensors (10-15x faster on these layers). It has an autograd
  formula, so training uses it too.

Training a VAE on the CPU gains too: a decoder fine-tune step (batch 4, 33 frames of 64x64) took 2.9 s
instead of 5.1 s on 2 cores.

Parameters and state dict are unchanged (the new classes subclass diffusers' ones), so `accelerate` can be
applied to any loaded VAE. The convolution takes the original path for non-CPU or non-float32 tensors; the
norm's arithmetic is used everywhere (it upcasts to float32 like diffusers' does for half precision).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm


class FastRMSNorm(WanRMS_norm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channel_first:
            return super().forward(x)
        xf = x.float()
        inv = torch.rsqrt((xf * xf).sum(dim=1, keepdim=True).clamp_min(1e-24))  # F.normalize's eps 1e-12, squared
        return (xf * inv).to(x.dtype) * self.scale * self.gamma + self.bias


class FastCausalConv3d(WanCausalConv3d):
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        onednn = x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        if not onednn:
            return super()._conv_forward(x, weight, bias)
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(), weight.contiguous(), bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups,
        )


def accelerate(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Swap the VAE's RMS norms and causal convs for the faster twins above (in place); returns `vae`."""
    for module in vae.modules():
        if type(module) is WanRMS_norm:
            module.__class__ = FastRMSNorm
        elif type(module) is WanCausalConv3d:
            module.__class__ = FastCausalConv3d
    return vae

