"""Every Triton kernel compiles for Hopper (sm_90, down to the cubin) on this CPU machine, with the launch settings
and GPU-only branches (hardware FP8 casts, inline PTX) the GPU takes. The interpreted tests run other code for
those branches, so without this a GPU-only branch that Triton refuses would first fail on the device."""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from longstream.quant.kernels import (  # noqa: E402
    fp8_attention, fp8_conv, fp8_quant, kv_attention, kv_dequant, kv_quant, nvfp4_gemm, nvfp4_gemm_decoded,
    nvfp4_gemm_rs, nvfp4_quant)

HOPPER = GPUTarget("cuda", 90, 32)


HOPPER_SHARED_BYTES = 232448  # an H100's / H200's shared memory per block (227 KiB)


def compile_for_hopper(kernel, pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...] = (),
                       num_warps: int = 4, num_stages: int = 3, multiples_of_16: tuple[str, ...] = ()) -> dict:
    """Compile `kernel` for sm_90; pointers maps each pointer argument to its element type ("bf16", "u8", ...),
    other non-constexpr arguments are int32 unless named in `floats`. Pointers are marked 16-byte aligned, and the
    integers named in `multiples_of_16` divisible by 16, as a launch specialises them (PyTorch's allocations, the
    model's strides). Returns the compiled stages' text/binaries."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:  # a TMA descriptor's type ("tensordesc<fp16[128, 64]>") is given whole
            signature[name] = pointers[name] if pointers[name].startswith("tensordesc") else "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if (name in pointers and not signature[name].startswith("tensordesc")) or name in multiples_of_16}
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(source, target=HOPPER, options=dict(num_warps=num_warps, num_stages=num_stages))
    return {**compiled.asm, "shared": compiled.metadata.shared}


def first_loop(ttgir: str, holding: str = "") -> list[str]:
    """The lines of the first `scf.for` loop of a TTGIR listing (its header through its closing brace) that has a
    line containing `holding`."""
    lines = ttgir.splitlines()
    for start in (i for i, line in enumerate(lines) if "scf.for" in line):
        indent = len(lines[start]) - len(lines[start].lstrip())
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(" " * indent + "}"))
        if any(holding in line for line in lines[start:end + 1]):
            return lines[start:end + 1]
    raise AssertionError(f"no loop holds {holding!r}")


@pytest.mark.parametrize("visible", [False, True])
def test_fp8_attention_compiles_with_hardware_fp8(visible: bool) -> None:
    cfg = fp8_attention.GPU_CONFIG
    asm = compile_for_hopper(
        fp8_attention._fp8_attention_kernel,
        dict(q_ptr="bf16", k_ptr="fp8e4nv", ks_ptr="fp32", v_ptr="fp8e4nv", vs_ptr="fp32", vis_ptr="u8",
             out_ptr="bf16"),
        dict(D=128, DP=128, BM=cfg["block_m"], BN=cfg["block_n"], HAS_VISIBLE=visible, HW=True),
        floats=("score_factor",), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        multiples_of_16=("s_alloc", "sqh", "sqs", "soh", "sos"))
    assert "cubin" in asm and "cvt.rn.satfinite.e4m3x2.f32" in asm["ptx"]  # the hardware E4M3 cast
    # K and V tiles both stream in with asynchronous copies (V's were synchronous loads while the cache kept the
    # values D-contiguous, an operand FP8 wgmma cannot take: the kernel ran at ~150 TFLOP/s, 1/4 of cuDNN's bf16)
    for name in ("k_codes", "v_codes"):
        assert re.search(rf"%{name}\S* = ttg\.async_copy_global_to_local", asm["ttgir"]), name
    assert asm["ttgir"].count("ttng.warp_group_dot ") >= 2 and asm["shared"] <= HOPPER_SHARED_BYTES


def test_fp8_rowwise_quantize_compiles_with_hardware_cast() -> None:
    asm = compile_for_hopper(fp8_quant._fp8_rowwise_kernel, dict(x_ptr="bf16", q_ptr="u8", scale_ptr="fp32"),
                             dict(BLOCK_K=4096, HW_CAST=True), num_warps=fp8_quant._warps_for(4096))
    assert "cubin" in asm and "e4m3x2" in asm["ptx"]


@pytest.mark.parametrize("cfg", nvfp4_gemm._CONFIGS[:2])
def test_nvfp4_gemm_compiles_with_inline_decode(cfg: tuple) -> None:
    bm, bn, bk, stages, warps = cfg
    asm = compile_for_hopper(
        nvfp4_gemm._nvfp4_gemm_kernel,
        dict(a_ptr="i32", as_ptr="u8", b_ptr="i32", bs_ptr="u8", ga_ptr="fp32", gb_ptr="fp32", c_ptr="bf16"),
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=True, DECODE_ASM=True),
        num_warps=warps, num_stages=stages)
    assert "cubin" in asm


def test_nvfp4_register_operand_gemm_compiles_as_designed() -> None:
    """The weights reach wgmma from registers (no shared-memory store of the decoded tile) and the activations
    stream in with asynchronous copies: the structure `nvfp4_gemm_rs` exists for."""
    cfg = dict(nvfp4_gemm_rs.GPU_CONFIG)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    asm = compile_for_hopper(
        nvfp4_gemm_rs._nvfp4_gemm_rs_kernel,
        dict(x_ptr="fp16", w_ptr="i32", ws_ptr="u8", ga_ptr="fp32", gb_ptr="fp32", c_ptr="bf16"),
        dict(cfg, DECODE_ASM=True), num_warps=warps, num_stages=stages,
        multiples_of_16=("stride_xm", "stride_wn", "stride_wsn", "stride_cm"))
    loop = first_loop(asm["ttgir"])  # the full K steps (a K tail gets one plain step after it)
    dots = [line for line in loop if "ttng.warp_group_dot " in line]
    assert dots and all("xf16, #ttg.dot_op<{opIdx = 0" in line for line in dots)  # A: a register tensor
    assert any("async_copy_global_to_local" in line and "!tt.ptr<f16>" in line for line in loop)
    assert not any("ttg.local_alloc %" in line and "xf16" in line for line in loop)  # no decoded tile stored
    assert all("pendings = 0" not in line for line in loop if "warp_group_dot_wait" in line)  # wgmmas overlap


@pytest.mark.parametrize("cfg", nvfp4_gemm_decoded._CONFIGS)
def test_decoded_nvfp4_gemm_compiles_as_a_pipelined_gemm(cfg: tuple) -> None:
    """The GEMM after the decode is the plain pipelined one: both fp16 tiles stream in with asynchronous copies and
    each wgmma overlaps the next step (the fused kernel waits for every wgmma)."""
    bm, bn, bk, stages, warps = cfg
    asm = compile_for_hopper(
        nvfp4_gemm_decoded._scaled_gemm_kernel,
        dict(a_ptr="fp16", b_ptr="fp16", ga_ptr="fp32", gb_ptr="fp32", bias_ptr="fp32", c_ptr="bf16"),
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=True, HAS_BIAS=True), num_warps=warps,
        num_stages=stages,
        multiples_of_16=("stride_am", "stride_bn", "stride_cm"))
    loop = first_loop(asm["ttgir"])
    assert "cubin" in asm
    assert sum("async_copy_global_to_local" in line and "!tt.ptr<f16>" in line for line in loop) == 2
    waits = [line for line in loop if "warp_group_dot_wait" in line]
    assert waits and all("pendings = 0" not in line for line in waits)


@pytest.mark.parametrize("cfg", nvfp4_gemm_decoded._TMA_CONFIGS)
def test_decoded_gemm_tma_compiles_as_one_flattened_tma_pipeline(cfg: tuple) -> None:
    """The persistent variant: the tile loop and the K loop are one loop, both fp16 tiles arrive by TMA, and each
    wgmma overlaps the next step."""
    bm, bn, bk, stages, warps = cfg
    asm = compile_for_hopper(
        nvfp4_gemm_decoded._scaled_gemm_tma_kernel,
        dict(a_desc=f"tensordesc<fp16[{bm}, {bk}]>", b_desc=f"tensordesc<fp16[{bn}, {bk}]>", ga_ptr="fp32",
             gb_ptr="fp32", bias_ptr="fp32", c_ptr="bf16"),
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_SMS=132, HAS_BIAS=True), num_warps=warps,
        num_stages=stages, multiples_of_16=("stride_cm",))
    loop = first_loop(asm["ttgir"], holding="ttng.warp_group_dot ")
    assert "cubin" in asm and asm["shared"] <= HOPPER_SHARED_BYTES
    assert sum("async_tma_copy_global_to_local" in line for line in loop) == 2
    assert not any("scf.for" in line for line in loop[1:])  # flattened: no inner loop
    waits = [line for line in loop if "warp_group_dot_wait" in line]
    assert any("pendings = 1" in line for line in waits)


def test_nvfp4_decode_compiles() -> None:
    asm = compile_for_hopper(nvfp4_gemm._decode_kernel, dict(w_ptr="i32", s_ptr="u8", o_ptr="bf16", g_ptr="fp32"),
                             dict(BLOCK_R=32, BLOCK_K=64, HAS_G=True))
    assert "cubin" in asm


@pytest.mark.parametrize("g_is_amax", [False, True])
def test_nvfp4_quantize_compiles(g_is_amax: bool) -> None:
    amax = compile_for_hopper(nvfp4_quant._amax_kernel, dict(x_ptr="bf16", out_ptr="i32"),
                              dict(BLOCK=nvfp4_quant._AMAX_BLOCK, STEPS=nvfp4_quant._AMAX_STEPS), num_warps=8)
    quant = compile_for_hopper(
        nvfp4_quant._quantize_kernel,
        dict(x_ptr="bf16", q_ptr="u8", s_ptr="u8", g_ptr="fp32", g_out_ptr="fp32", flag_ptr="i32", d_ptr="u8"),
        dict(G_IS_AMAX=g_is_amax, G_PER_ROW=not g_is_amax, BLOCK_M=nvfp4_quant._Q_BLOCK_M,
             BLOCK_K=nvfp4_quant._Q_BLOCK_K, WRITE_CODES=True, WRITE_DECODED=False))
    decoded = compile_for_hopper(  # the activation side of impl "decoded": fp16 values, no codes
        nvfp4_quant._quantize_kernel,
        dict(x_ptr="bf16", q_ptr="fp16", s_ptr="fp16", g_ptr="fp32", g_out_ptr="fp32", flag_ptr="i32",
             d_ptr="fp16"),
        dict(G_IS_AMAX=True, G_PER_ROW=False, BLOCK_M=nvfp4_quant._Q_BLOCK_M, BLOCK_K=nvfp4_quant._Q_BLOCK_K,
             WRITE_CODES=False, WRITE_DECODED=True))
    assert "cubin" in amax and "cubin" in quant and "cubin" in decoded


@pytest.mark.parametrize("tokens_last", [False, True])
def test_kv_kernels_compile(tokens_last: bool) -> None:
    nvfp4_kv = dict(codes_ptr="u8", blocks_ptr="u8", global_ptr="fp32", out_ptr="bf16")
    sizes = dict(D=128, DP=128, BT=kv_dequant.BLOCK_T)
    write = compile_for_hopper(kv_quant._fp8_kv_write_kernel,
                               dict(x_ptr="bf16", index_ptr="i64", codes_ptr="u8", scale_ptr="fp32"),
                               dict(D=128, DP=128, BT=kv_quant.BLOCK_T, TOKENS_LAST=tokens_last, HW_CAST=True),
                               multiples_of_16=("tokens_per_frame", "s_alloc", "sxb", "sxh", "sxn"))
    # bit-exact with the eager write: the hardware E4M3 cast, IEEE division, no flushed subnormals
    assert "cvt.rn.satfinite.e4m3x2.f32" in write["ptx"] and "div.rn.f32" in write["ptx"]
    assert ".ftz" not in write["ptx"]
    asms = [write,
        compile_for_hopper(kv_dequant._nvfp4_kernel, nvfp4_kv, sizes),
        compile_for_hopper(kv_dequant._fp8_kernel, dict(codes_ptr="u8", scale_ptr="fp32", out_ptr="bf16"),
                           dict(sizes, TOKENS_LAST=tokens_last)),
        compile_for_hopper(
            kv_attention._attention_kernel,
            dict(q_ptr="bf16", kc_ptr="u8", kb_ptr="u8", kg_ptr="fp32", vc_ptr="u8", vb_ptr="u8", vg_ptr="fp32",
                 out_ptr="bf16"),
            dict(D=128, DP=128, BM=kv_attention.BLOCK_M, BN=kv_attention.BLOCK_N), floats=("sm_scale",)),
    ]
    assert all("cubin" in asm for asm in asms)


@pytest.mark.parametrize("cfg", fp8_conv._CONFIGS)
@pytest.mark.parametrize("promote", [True, False])
def test_fp8_conv_compiles_as_one_flattened_fp8_tma_pipeline(cfg: tuple, promote: bool) -> None:
    """The VAE's FP8 implicit-GEMM convolution: one flattened loop, both E4M3 tiles by TMA (the taps are row
    offsets of the A load), FP8 wgmma with each one overlapping the next step, with `promote` each K step's sum
    promoted to the float32 accumulator; its shared memory fits a Hopper block (a launch would fail, not fall
    back)."""
    bm, bn, bk, stages, warps = cfg
    asm = compile_for_hopper(
        fp8_conv._fp8_conv3d_kernel,
        dict(x_desc=f"tensordesc<fp8e4nv[{bm}, {bk}]>", w_desc=f"tensordesc<fp8e4nv[{bn}, {bk}]>", w_scale_ptr="fp32",
             bias_ptr="bf16", res_ptr="bf16", out_ptr="bf16"),
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_SMS=132, HAS_BIAS=True, HAS_RES=True, HW=True,
             PROMOTE=promote),
        floats=("x_scale",), num_warps=warps, num_stages=stages)
    loop = first_loop(asm["ttgir"], holding="ttng.warp_group_dot ")
    assert "cubin" in asm and asm["shared"] <= HOPPER_SHARED_BYTES
    assert sum("async_tma_copy_global_to_local" in line for line in loop) == 2
    assert not any("scf.for" in line for line in loop[1:])
    dots = [line for line in loop if "ttng.warp_group_dot " in line]
    imprecise = f"maxNumImpreciseAcc = {bk if promote else 2**30} "  # 2**30: never promoted
    assert dots and all("f8E4M3FN" in line and imprecise in line for line in dots)
    assert any("pendings = 1" in line for line in loop if "warp_group_dot_wait" in line)


def test_fp8_norm_quantize_compiles_with_hardware_cast() -> None:
    asm = compile_for_hopper(fp8_conv._norm_silu_fp8_kernel,
                             dict(x_ptr="bf16", gamma_ptr="bf16", beta_ptr="bf16", buf_ptr="u8"),
                             dict(BLOCK_P=4, BLOCK_C=1024, SILU=True, HAS_BETA=False, HW=True),
                             floats=("norm_scale", "inv_x_scale"))
    assert "cubin" in asm and "cvt.rn.satfinite.e4m3x2.f32" in asm["ptx"]
