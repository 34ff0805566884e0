"""Triton kernels: the VAE decoder's residual-block convolutions in FP8 (formats and reference twin:
`longstream.quant.fp8_conv`).

``norm_silu_fp8_triton``: the norm (+ SiLU) of a channels-last activation, divided by the layer's static scale and
rounded to E4M3, written straight into the convolution's zero-padded input buffer behind the causal history; one
program holds a few whole pixels (all C channels) in registers.

``fp8_conv3d_triton``: the causal 3x3x3 convolution as an implicit GEMM. Seen as a matrix [rows, C] (one row a
pixel of the padded buffer), the 27 taps are 27 row offsets, ``dt (H + 2)(W + 2) + dh (W + 2) + dw``, so the A
tile of a K step is a plain [BLOCK_M, BLOCK_K] TMA load at a shifted row and nothing is gathered. Output rows run
over the padded grid of the T output frames; rows in the border columns are computed and dropped by the
epilogue (0.9-7% extra work at the decoder's sizes). The epilogue applies ``x_scale * w_scale[o]``, the bias and
the residual in float32 before one rounding. A persistent kernel, as ``nvfp4_gemm_decoded``'s TMA GEMM.
Under Triton's interpreter the E4M3 bytes are decoded exactly to float32 and multiplied in float32.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import fp8_conv as reference
from ...devices import has_tma
from . import interpreting, patch_interpreter
from .fp8_attention import _e4m3_value
from .fp8_quant import E4M3_MAX, _e4m3_code
from .nvfp4_gemm import _grouped_tile
from .nvfp4_gemm_decoded import _autotuned, _program_slots, tma_block_shapes

HISTORY = tl.constexpr(reference.HISTORY)


@triton.jit
def _norm_silu_fp8_kernel(x_ptr, gamma_ptr, beta_ptr, buf_ptr, pixels, C, T, H, W, norm_scale, inv_x_scale,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr,
                          HAS_BETA: tl.constexpr, HW: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (p < pixels)[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + p.to(tl.int64)[:, None] * C + c[None, :], mask=ok, other=0.0).to(tl.float32)
    inv = tl.math.div_rn(1.0, tl.sqrt_rn(tl.maximum(tl.sum(x * x, axis=1), 1e-24)))
    y = x * inv[:, None] * norm_scale * tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BETA:
        y += tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if SILU:
        y = y * tl.sigmoid(y)  # no IEEE division per element: the first version's two took twice the bf16 norm's time
    v = tl.minimum(tl.maximum(y * inv_x_scale, -E4M3_MAX), E4M3_MAX)
    if HW:
        code = v.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    else:
        code = _e4m3_code(v)
    w = p % W  # pixel (b, t, h, w) -> buffer (b, HISTORY + t, h + 1, w + 1)
    h = (p // W) % H
    bt = p // (W * H)
    row = ((bt // T) * (T + HISTORY) + bt % T + HISTORY) * (H + 2) * (W + 2) + (h + 1) * (W + 2) + w + 1
    tl.store(buf_ptr + row.to(tl.int64)[:, None] * C + c[None, :], code, mask=ok)


def norm_silu_fp8_triton(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | float, norm_scale: float,
                         silu: bool, x_scale: float, history: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, T, H, W, C] (channels innermost, contiguous) -> the padded buffer of its norm (+ SiLU) codes:
    `reference.norm_silu_quantize_reference`'s result up to float rounding (a value at a rounding boundary may
    take the neighbouring code)."""
    patch_interpreter()
    b, t, h, w, c = x.shape
    if not x.is_contiguous():
        raise ValueError("norm_silu_fp8_triton needs x [B, T, H, W, C] contiguous (channels-last)")
    if c > 4096:
        raise ValueError(f"up to 4096 channels, got {c}")
    if history is not None and (history.shape != (b, reference.HISTORY, h + 2, w + 2, c)
                                or history.dtype != torch.uint8 or history.device != x.device):
        raise ValueError(f"history must be uint8 [{b}, {reference.HISTORY}, {h + 2}, {w + 2}, {c}] on {x.device}, got "
                         f"{history.dtype} {tuple(history.shape)} on {history.device}")
    buf = torch.empty(b, reference.HISTORY + t, h + 2, w + 2, c, dtype=torch.uint8, device=x.device)
    buf[:, reference.HISTORY:, 0] = 0
    buf[:, reference.HISTORY:, -1] = 0
    buf[:, reference.HISTORY:, :, 0] = 0
    buf[:, reference.HISTORY:, :, -1] = 0
    if history is None:
        buf[:, :reference.HISTORY] = 0
    else:
        buf[:, :reference.HISTORY] = history
    pixels = b * t * h * w
    if pixels:
        block_c = triton.next_power_of_2(c)
        block_p = max(1, 4096 // block_c)
        has_beta = isinstance(beta, torch.Tensor)
        with _on(x.device):
            _norm_silu_fp8_kernel[(triton.cdiv(pixels, block_p),)](
                x, gamma.reshape(-1), beta.reshape(-1) if has_beta else gamma, buf, pixels, c, t, h, w,
                float(norm_scale), 1.0 / x_scale, BLOCK_P=block_p, BLOCK_C=block_c,
                SILU=silu, HAS_BETA=has_beta, HW=not interpreting(), num_warps=4)
    return buf


@triton.jit
def _fp8_conv3d_kernel(x_desc, w_desc, w_scale_ptr, bias_ptr, res_ptr, out_ptr, x_scale,
                       B, T, H, W, N, C,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       NUM_SMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HW: tl.constexpr,
                       PROMOTE: tl.constexpr = True):
    row_len = W + 2
    plane = (H + 2) * row_len
    rows = T * plane  # output rows of one batch element, over the padded grid
    tiles_m, tiles_n = tl.cdiv(rows, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_batch = tiles_m * tiles_n
    c_steps = C // BLOCK_K
    for tile in tl.range(tl.program_id(0), B * per_batch, NUM_SMS, flatten=True):
        b = tile // per_batch
        pid_m, pid_n = _grouped_tile(tile % per_batch, tiles_m, tiles_n, GROUP_M)
        row0 = b * (T + HISTORY) * plane + pid_m * BLOCK_M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(27 * c_steps):
            tap = step // c_steps
            shift = (tap // 9) * plane + ((tap // 3) % 3) * row_len + tap % 3
            a = x_desc.load([row0 + shift, (step % c_steps) * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, step * BLOCK_K])
            if not HW:
                a = _e4m3_value(a)
                w = _e4m3_value(w)
            if PROMOTE:  # each K step's products summed in float32 (module docstring)
                acc = tl.dot(a, w.T, acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, w.T, acc)
        p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # padded-grid position (t, h, w) of each output row
        pw = p % row_len
        ph = (p // row_len) % (H + 2)
        pt = p // plane
        out_row = ((b * T + pt) * H + ph) * W + pw
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        ok = ((pt < T) & (ph < H) & (pw < W))[:, None] & n_ok[None, :]
        out = acc * (x_scale * tl.load(w_scale_ptr + n, mask=n_ok, other=0.0))[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        offsets = out_row.to(tl.int64)[:, None] * N + n[None, :]
        if HAS_RES:
            out += tl.load(res_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): FP8 tiles of 128 bytes along K; the autotuner picks per shape.
_CONFIGS = [
    (128, 256, 128, 3, 8),
    (128, 128, 128, 4, 8),
    (128, 256, 64, 4, 8),
    (128, 128, 128, 3, 4),
]
_fp8_conv3d_autotuned = _autotuned(_fp8_conv3d_kernel, _CONFIGS, tma_block_shapes("x_desc", "w_desc"),
                                   key=("B", "T", "H", "W", "N", "C", "PROMOTE"))
INTERPRET_CONFIG = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)
GPU_ALIGN = 128  # channels a multiple of every config's BLOCK_K


def supported(channels_in: int, device: torch.device) -> bool:
    """Whether `fp8_conv3d_triton` runs C input channels on `device`: on CUDA compute capability 9.x / 10.x (TMA
    and FP8 tensor cores) with C a multiple of 128; in the interpreter a multiple of 16."""
    if interpreting():
        return channels_in % INTERPRET_CONFIG["BLOCK_K"] == 0
    return has_tma(device) and channels_in % GPU_ALIGN == 0


def fp8_conv3d_triton(buffer: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, x_scale: float,
                      bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None, *,
                      out_dtype: torch.dtype = torch.bfloat16, config: Optional[dict] = None,
                      promote: bool = True) -> torch.Tensor:
    """The causal 3x3x3 convolution of a padded buffer [B, 2 + T, H + 2, W + 2, C] (uint8 E4M3 bytes) with weight
    codes [O, 27 C] and scales [O] (`reference.quantize_weight`) -> [B, T, H, W, O] in `out_dtype`, plus `bias`
    [O] and `residual` [B, T, H, W, O] (contiguous) if given. `config`: fixed BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    num_warps, num_stages instead of autotuning (the interpreter's default is small). `promote=False` lets the
    tensor cores accumulate all K steps in their reduced-precision FP8 accumulator (bench/fp8_conv.py compares)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    patch_interpreter()
    b, frames, hp, wp, c = buffer.shape
    t, h, w, o = frames - reference.HISTORY, hp - 2, wp - 2, w_codes.shape[0]
    if w_codes.shape != (o, 27 * c) or w_scale.shape != (o,):
        raise ValueError(f"weights {tuple(w_codes.shape)} / scales {tuple(w_scale.shape)} do not fit {c} channels")
    if not supported(c, buffer.device):
        raise ValueError(f"the FP8 convolution cannot run {c} channels on {buffer.device}")
    if buffer.dtype != torch.uint8 or not buffer.is_contiguous() or buffer.data_ptr() % 16:
        raise ValueError("the buffer must be a contiguous, 16-byte aligned uint8 tensor (E4M3 bytes)")
    if config is not None and c % config["BLOCK_K"]:
        raise ValueError(f"BLOCK_K {config['BLOCK_K']} does not divide {c} channels")
    if residual is not None and (residual.shape != (b, t, h, w, o) or not residual.is_contiguous()):
        raise ValueError(f"residual must be contiguous [{b}, {t}, {h}, {w}, {o}], got {tuple(residual.shape)}")
    out = torch.empty(b, t, h, w, o, dtype=out_dtype, device=buffer.device)
    if out.numel() == 0:
        return out
    hw = not interpreting()
    codes = torch.float8_e4m3fn if hw else torch.uint8  # the interpreter decodes the bytes itself
    x2, w2 = buffer.view(codes).reshape(-1, c), w_codes.view(codes)
    if config is None and not hw:
        config = INTERPRET_CONFIG
    bm, bn, bk = (config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]) if config else (128, 128, 128)
    descs = (TensorDescriptor.from_tensor(x2, [bm, bk]), TensorDescriptor.from_tensor(w2, [bn, bk]))
    slots = _program_slots(buffer.device)
    rest = (w_scale.float().contiguous(), out if bias is None else bias.contiguous(),
            out if residual is None else residual, out, float(x_scale), b, t, h, w, o, c)
    flags = dict(NUM_SMS=slots, HAS_BIAS=bias is not None, HAS_RES=residual is not None, HW=hw, PROMOTE=promote)
    rows = t * hp * wp
    with _on(buffer.device):
        if config is None:
            def grid(meta):
                return (min(slots, b * triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(o, meta["BLOCK_N"])),)
            _fp8_conv3d_autotuned[grid](*descs, *rest, **flags)
        else:
            grid = (min(slots, b * triton.cdiv(rows, bm) * triton.cdiv(o, bn)),)
            _fp8_conv3d_kernel[grid](*descs, *rest, **flags, **config)
    return out


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current for a launch: Triton launches on the current CUDA device, not the tensors' (a
    decode on a second GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
