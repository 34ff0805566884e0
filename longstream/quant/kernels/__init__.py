"""Triton kernels for the quantized paths, each with a plain-PyTorch reference twin.

* ``nvfp4_quant``: fused NVFP4 quantize (amax reduction + 1x16 block scales + RNE to E2M1 + nibble packing),
  bit-exact with ``longstream.quant.nvfp4.quantize``.
* ``nvfp4_gemm``: W4A4 GEMM from packed NVFP4 operands (decode to fp16 in registers, tensor-core dot, fp32
  accumulation), and a decode-only kernel (NVFP4 -> bf16) for the split "decode + cuBLAS" variant.
* ``nvfp4_gemm_rs``: the same GEMM with the weights decoded as the tensor cores' register operand and the
  activations decoded to fp16 first (an experiment timed by ``bench/gemm.py``).
* ``nvfp4_gemm_decoded``: both operands decoded exactly to fp16, then an fp16 GEMM with the global scales in its
  epilogue (``impl="decoded"``, the default: exact like the fused GEMM, pipelined like a plain one), also as a
  persistent TMA kernel; the W4A4 linear whose activation quantize writes its fp16 decode directly.
* ``kv_quant``: the FP8 KV cache's write (per-frame amax, e4m3 codes, scale) in one pass per frame, bit-exact
  with ``FP8KVStorage.write_reference``.
* ``kv_dequant``: quantized KV cache (NVFP4, FP8) -> compute dtype in one pass, bit-exact with the storages' reads.
* ``kv_attention``: attention over an NVFP4 KV cache decoding K/V tiles in registers (flash-style online
  softmax), equal to ``kv_dequant`` + SDPA up to summation order.
* ``fp8_conv``: the VAE decoder's residual blocks in FP8: norm + SiLU written as E4M3 codes into a padded causal
  buffer, and the causal 3x3x3 convolution as an implicit GEMM (TMA, FP8 tensor cores), against
  ``longstream.quant.fp8_conv``'s float64 twin.
* ``native``: Blackwell ``torch._scaled_mm`` with FP4 operands and swizzled E4M3 block scales (pure PyTorch;
  written to the documented API, not run here: no Blackwell GPU).

Triton is imported only by the kernel modules, so ``import longstream.quant.kernels`` works without it.
Set ``TRITON_INTERPRET=1`` *before* the first import of a kernel module to run the kernels on CPU tensors.
"""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """True when ``import triton`` can succeed (no import is done here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``: kernels execute on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def patch_interpreter() -> None:
    """Make Triton 3.6's interpreter run runtime loop bounds (``range(0, K, BK)``) under NumPy >= 2.4.

    The interpreter holds scalars as 1-element arrays and converts them with ``int(array)``, which NumPy 2.4
    rejects for arrays with ndim > 0. This re-registers ``tensor.__index__`` with an explicit element read.
    Idempotent; does nothing outside interpreter mode.
    """
    if not interpreting():
        return
    from triton.runtime import interpreter as interp

    orig = interp._patch_lang_tensor
    if getattr(orig, "_longstream_patched", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._longstream_patched = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = patched
