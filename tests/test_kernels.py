"""Triton kernels against their reference twins, and the native (Blackwell) operand layout.

* CPU: the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) in ONE child process (the variable
  must be set before triton is imported, and other tests in this process must not see it). The child runs every
  check in ``_interpreter_checks`` and prints a JSON report; each ``test_interp_*`` asserts one entry.
* CPU: the native backend's operands (FP4 views, swizzled scales) against an independent emulation of
  ``torch._scaled_mm``'s NVFP4 contract; dispatch.
* GPU (``@pytest.mark.gpu``): the same comparisons at the 5B model's sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from longstream.quant import backend as qb
from longstream.quant import nvfp4 as nv
from longstream.quant.kernels import native

_MARK = "KERNEL_CHECKS_JSON:"
TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ------------------------------------------------------------------ inputs (shared by CPU and GPU checks)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def heavy(shape, seed: int, spread: float = 2.0) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(shape, generator=g) * torch.exp(spread * torch.randn(shape, generator=g))


def pow2_ties(rows: int, k: int, seed: int, expected: bool = False):
    """Global scale exactly 1 and power-of-two block scales, so scaled values land exactly on E2M1 grid points
    and RNE ties (with random signs). With ``expected``, also returns the decoded values RNE must give."""
    g = _gen(seed)
    nb = k // 16
    e = torch.randint(-6, 9, (rows, nb, 1), generator=g).double()
    vals = torch.tensor(GRID + TIES, dtype=torch.float64)
    rne = torch.tensor(GRID + (0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0), dtype=torch.float64)  # ties to even codes
    idx = torch.randint(0, len(vals), (rows, nb, 16), generator=g)
    sign = torch.where(torch.rand(rows, nb, 16, generator=g) < 0.5, -1.0, 1.0).double()
    v, r = vals[idx] * sign, rne[idx] * sign
    v[..., 0] = r[..., 0] = 6.0  # block amax 6 * 2^e -> block scale exactly 2^e
    x, want = v * torch.pow(2.0, e), r * torch.pow(2.0, e)
    x[0, 0, :] = want[0, 0, :] = 0.0
    x[0, 0, 0] = want[0, 0, 0] = 2688.0  # tensor amax 6 * 448 -> global scale exactly 1
    x = x.reshape(rows, k).float()
    return (x, want.reshape(rows, k)) if expected else x


def near_ties(rows: int, k: int, seed: int) -> torch.Tensor:
    """Values a few ulps around RNE ties after scaling by non-power-of-two block scales."""
    g = _gen(seed)
    t = torch.tensor(TIES)[torch.randint(0, len(TIES), (rows, k // 16, 16), generator=g)]
    s = (1 + torch.rand(rows, k // 16, 1, generator=g)) * torch.pow(2.0, torch.randint(-4, 4, (rows, k // 16, 1),
                                                                                         generator=g).float())
    x = t * s
    steps = torch.randint(-3, 4, x.shape, generator=g)
    for _ in range(3):  # nudge by up to 3 ulps either way
        x = torch.where(steps > 0, torch.nextafter(x, torch.full_like(x, 1e30)), x)
        x = torch.where(steps < 0, torch.nextafter(x, torch.full_like(x, -1e30)), x)
        steps = steps - steps.sign()
    return x.reshape(rows, k) * torch.where(torch.rand(rows, k, generator=g) < 0.5, -1.0, 1.0)


def special(rows: int, k: int, seed: int) -> torch.Tensor:
    """Zero blocks, tiny blocks, -0.0, a huge outlier: scale clamping at 2^-6, saturation, signed zeros."""
    x = heavy((rows, k), seed)
    x[1, :16] = 0.0
    x[2, 16:32] = -0.0
    x[3, :] = 1e-30
    x[4, 32:48] = torch.linspace(-1e-6, 1e-6, 16)
    x[5, 0] = 1e6
    return x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def same_q(a: nv.NVFP4Tensor, b: nv.NVFP4Tensor) -> bool:
    return (a.data.shape == b.data.shape and torch.equal(a.data.cpu(), b.data.cpu())
            and torch.equal(a.scale.view(torch.uint8).cpu(), b.scale.view(torch.uint8).cpu())
            and torch.equal(a.global_scale.reshape(()).view(torch.int32).cpu(),
                            b.global_scale.reshape(()).view(torch.int32).cpu()))


def ref_matmul(a: nv.NVFP4Tensor, b: nv.NVFP4Tensor) -> torch.Tensor:
    return qb.nvfp4_matmul(a, b, out_dtype=torch.float32, backend="reference")


# ------------------------------------------------------------------ interpreter checks (run in the child)


def _interpreter_checks() -> Dict[str, Callable[[], object]]:
    """name -> check; each returns a JSON-able detail or raises AssertionError."""
    from longstream.quant.kernels import nvfp4_gemm as kg
    from longstream.quant.kernels import nvfp4_quant as kq

    def q_exact(x, **kw):
        r, t = nv.quantize(x, **kw), kq.nvfp4_quantize_triton(x, **kw)
        assert same_q(r, t), f"quantize mismatch for shape {tuple(x.shape)} {x.dtype} {kw}"

    def quant_random():
        for shape in [(64, 256), (37, 160), (3, 5, 48), (1, 16)]:  # partial tiles in M and K, leading dims
            x = heavy(shape, 1)
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                q_exact(x.to(dt))
        return "ok"

    def quant_heavy_tailed():
        q_exact(heavy((48, 320), 2, spread=4.0))
        q_exact(heavy((48, 320), 3, spread=0.1) * 1e-20)  # tiny but normal global scale
        return "ok"

    def quant_ties():
        x, want = pow2_ties(40, 256, 4, expected=True)
        q = kq.nvfp4_quantize_triton(x)
        assert same_q(nv.quantize(x), q)
        assert torch.equal(q.dequantize(torch.float64), want)  # ties went to the even code, independently
        q_exact(near_ties(32, 192, 5))
        return "ok"

    def quant_special():
        q_exact(special(8, 64, 6))
        q_exact(torch.zeros(16, 32))  # all-zero tensor: g = 0, codes 0, scales 0
        q_exact(heavy((16, 64), 7), global_scale=torch.tensor(0.0))
        q_exact(heavy((16, 64), 8), global_scale=torch.tensor(1e-4))  # scales clamp at 448, codes saturate
        q_exact(heavy((16, 64), 9), global_scale=0.37)
        x = torch.full((4, 32), -0.0)
        x[0, 0] = 1.0
        q = kq.nvfp4_quantize_triton(x)
        assert int(nv.unpack_fp4(q.data)[1, 0]) == 8  # -0 keeps its sign
        return "ok"

    def quant_nonfinite():
        for bad in (float("nan"), float("inf")):
            x = heavy((8, 32), 10)
            x[3, 7] = bad
            for kw in ({}, {"global_scale": torch.tensor(0.5)}):
                try:
                    kq.nvfp4_quantize_triton(x, **kw)
                except ValueError:
                    continue
                raise AssertionError(f"no ValueError for {bad} with {kw}")
        try:
            kq.nvfp4_quantize_triton(heavy((8, 32), 11), global_scale=torch.tensor(-1.0))
        except ValueError:
            return "ok"
        raise AssertionError("negative global_scale accepted")

    def gemm_fp32():
        out = {}
        for (m, n, k) in [(64, 64, 128), (50, 70, 80), (33, 17, 96)]:  # K tails (80, 96 vs BLOCK_K 32) too
            a, b = nv.quantize(heavy((m, k), 12)), nv.quantize(heavy((n, k), 13, spread=0.5))
            e = rel(kg.nvfp4_matmul_triton(a, b, out_dtype=torch.float32), ref_matmul(a, b))
            assert e < 1e-5, f"rel err {e} at {(m, n, k)}"
            out[f"{m}x{n}x{k}"] = e
        # a wider K step than the tail, and grouped ordering over several tiles
        cfg = dict(kg.INTERPRET_CONFIG, BLOCK_K=64, GROUP_M=3)
        a, b = nv.quantize(heavy((96, 192), 14)), nv.quantize(heavy((80, 192), 15))
        e = rel(kg.nvfp4_matmul_triton(a, b, out_dtype=torch.float32, config=cfg), ref_matmul(a, b))
        assert e < 1e-5, e
        return out

    def gemm_bf16_and_leading_dims():
        a = nv.quantize(heavy((2, 24, 64), 16))
        b = nv.quantize(heavy((40, 64), 17))
        out = kg.nvfp4_matmul_triton(a, b)
        ref = ref_matmul(a, b)
        assert out.shape == (2, 24, 40) and out.dtype == torch.bfloat16
        diff = (out.float() - ref).abs()
        # one bf16 rounding of a float32 result that differs from ref only by summation order
        assert bool((diff <= ref.abs() * 2**-7 + 1e-5 * ref.abs().max()).all()), "bf16 output off by > 1 ulp"
        return rel(out, ref)

    def gemm_special():
        a = nv.quantize(special(32, 64, 18))
        z = nv.quantize(torch.zeros(16, 64))
        assert bool((kg.nvfp4_matmul_triton(a, z, out_dtype=torch.float32) == 0).all())
        b = nv.quantize(pow2_ties(48, 64, 19))
        e = rel(kg.nvfp4_matmul_triton(a, b, out_dtype=torch.float32), ref_matmul(a, b))
        assert e < 1e-5, e
        return e

    def dequantize_exact():
        q = nv.quantize(special(24, 96, 20))
        d = kg.nvfp4_dequantize_triton(q, dtype=torch.float32, global_scale=q.global_scale)
        assert torch.equal(d, q.dequantize(torch.float32))
        d16 = kg.nvfp4_dequantize_triton(q, dtype=torch.bfloat16)  # e2m1 * scale: exact in bf16
        assert torch.equal(d16.float(), nv.dequantize(q.data, q.scale, torch.tensor(1.0)))
        return "ok"

    def split_gemm():
        a, b = nv.quantize(heavy((40, 128), 21)), nv.quantize(heavy((24, 128), 22))
        e = rel(kg.nvfp4_matmul_split(a, b, out_dtype=torch.float32), ref_matmul(a, b))
        assert e < 1e-2, e  # bf16 operands/output: ~1e-3
        return e

    def rs_gemm():
        """Weights decoded as the register operand, activations decoded first: the float32 twin up to summation
        order, with K tails, tiles not dividing M or N, grouped order, leading dims, special and zero values."""
        from longstream.quant.kernels.nvfp4_gemm_rs import INTERPRET_CONFIG, nvfp4_matmul_rs

        errs = []
        for (m, n, k, seed) in [(64, 64, 128, 30), (50, 70, 80, 31), (33, 17, 96, 32)]:
            a, b = nv.quantize(heavy((m, k), seed)), nv.quantize(heavy((n, k), seed + 10, spread=0.5))
            errs.append(rel(nvfp4_matmul_rs(a, b, out_dtype=torch.float32), ref_matmul(a, b)))
        cfg = dict(INTERPRET_CONFIG, BLOCK_K=64, GROUP_N=3)
        a, b = nv.quantize(heavy((2, 48, 192), 33)), nv.quantize(heavy((100, 192), 34))
        out = nvfp4_matmul_rs(a, b, out_dtype=torch.float32, config=cfg)
        assert out.shape == (2, 48, 100)
        errs.append(rel(out, ref_matmul(a, b)))
        a, b = nv.quantize(special(32, 64, 35)), nv.quantize(pow2_ties(48, 64, 36))
        errs.append(rel(nvfp4_matmul_rs(a, b, out_dtype=torch.float32), ref_matmul(a, b)))
        assert bool((nvfp4_matmul_rs(a, nv.quantize(torch.zeros(16, 64)), out_dtype=torch.float32) == 0).all())
        assert max(errs) < 1e-5, errs
        return max(errs)

    def decoded_gemm():
        """Exact decode to fp16, then the fp16 GEMM with the global scales in its epilogue: the float32 twin up to
        summation order, with K tails, tiles not dividing M or N, grouped order, leading dims, special and zero
        values, and through the backend's impl="decoded"."""
        from longstream.quant.kernels.nvfp4_gemm_decoded import INTERPRET_CONFIG, nvfp4_matmul_decoded

        errs = []
        for (m, n, k, seed) in [(64, 64, 128, 40), (50, 70, 80, 41), (33, 17, 96, 42)]:
            a, b = nv.quantize(heavy((m, k), seed)), nv.quantize(heavy((n, k), seed + 10, spread=0.5))
            errs.append(rel(nvfp4_matmul_decoded(a, b, out_dtype=torch.float32), ref_matmul(a, b)))
        cfg = dict(INTERPRET_CONFIG, BLOCK_K=64, GROUP_M=3)
        a, b = nv.quantize(heavy((2, 48, 192), 43)), nv.quantize(heavy((100, 192), 44))
        out = nvfp4_matmul_decoded(a, b, out_dtype=torch.float32, config=cfg)
        assert out.shape == (2, 48, 100)
        errs.append(rel(out, ref_matmul(a, b)))
        a, b = nv.quantize(special(32, 64, 45)), nv.quantize(pow2_ties(48, 64, 46))
        errs.append(rel(qb.nvfp4_matmul(a, b, out_dtype=torch.float32, backend="triton", impl="decoded"),
                        ref_matmul(a, b)))
        assert bool((nvfp4_matmul_decoded(a, nv.quantize(torch.zeros(16, 64)), out_dtype=torch.float32) == 0).all())
        assert max(errs) < 1e-5, errs
        bf = nvfp4_matmul_decoded(a, b)  # one bf16 rounding of the float32 result
        assert bf.dtype == torch.bfloat16 and rel(bf, ref_matmul(a, b)) < 4e-3
        return max(errs)

    def decoded_gemm_tma():
        """The persistent TMA twin of the decoded GEMM: partial tiles in M, N and K (read as zeros past the
        tensor), more tiles than programs, grouped order, the bias epilogue, the linear's leading dims."""
        from longstream.quant.kernels.nvfp4_gemm_decoded import (INTERPRET_CONFIG, nvfp4_linear_decoded,
                                                                 nvfp4_matmul_decoded)

        errs = []
        for (m, n, k, seed) in [(64, 64, 128, 70), (50, 70, 80, 71), (130, 17, 96, 72)]:
            a, b = nv.quantize(heavy((m, k), seed)), nv.quantize(heavy((n, k), seed + 10, spread=0.5))
            errs.append(rel(nvfp4_matmul_decoded(a, b, out_dtype=torch.float32, kernel="tma"), ref_matmul(a, b)))
        a, b = nv.quantize(heavy((100, 192), 73)), nv.quantize(heavy((90, 192), 74))
        cfg = dict(INTERPRET_CONFIG, BLOCK_K=64, GROUP_M=3)
        errs.append(rel(nvfp4_matmul_decoded(a, b, out_dtype=torch.float32, config=cfg, kernel="tma"),
                        ref_matmul(a, b)))
        x, w = heavy((2, 21, 80), 75), nv.quantize(heavy((70, 80), 76, spread=0.5))
        bias = torch.randn(70, generator=_gen(77)) * 5
        want = nv.quantize(x.reshape(-1, 80)).dequantize(torch.float64) @ w.dequantize(torch.float64).T + bias.double()
        out = nvfp4_linear_decoded(x, w, bias, out_dtype=torch.float32, kernel="tma")
        assert out.shape == (2, 21, 70)
        errs.append(rel(out.reshape(-1, 70), want))
        assert max(errs) < 1e-5, errs
        return max(errs)

    def quantize_decoded():
        """The quantize pass writing e2m1 * scale in fp16 instead of codes: bit-exact with decoding the twin's
        codes without the global scale, on random, heavy-tailed, tie, near-tie and special values, partial tiles
        and leading dims; the global scale bit-exact too."""
        inputs = [heavy((64, 256), 50), heavy((37, 80), 51).to(torch.bfloat16), heavy((3, 5, 48), 52, spread=4.0),
                  pow2_ties(40, 256, 53), near_ties(24, 128, 54), special(8, 64, 55), torch.zeros(4, 32)]
        for x in inputs:
            d, g = kq.nvfp4_quantize_decoded_triton(x)
            q = nv.quantize(x)
            assert d.dtype == torch.float16 and d.shape == x.shape
            assert torch.equal(d, nv.dequantize(q.data, q.scale, 1.0, dtype=torch.float16)), tuple(x.shape)
            assert torch.equal(g.view(torch.int32), q.global_scale.reshape(()).view(torch.int32))
        return "ok"

    def decoded_linear():
        """quantize(x) @ w^T + bias through the fused quantize-decode and the bias epilogue: the float64 math on
        the quantized operands, and the backend's nvfp4_linear on both backends."""
        from longstream.quant.kernels.nvfp4_gemm_decoded import nvfp4_linear_decoded

        errs = []
        for (lead, n, k, seed) in [((64,), 48, 128, 60), ((2, 21), 70, 80, 61)]:
            x, w = heavy((*lead, k), seed), nv.quantize(heavy((n, k), seed + 1, spread=0.5))
            bias = torch.randn(n, generator=_gen(seed + 2)) * 5
            want = (nv.quantize(x.reshape(-1, k)).dequantize(torch.float64) @ w.dequantize(torch.float64).T
                    + bias.double()).reshape(*lead, n)
            out = nvfp4_linear_decoded(x, w, bias, out_dtype=torch.float32)
            assert out.shape == (*lead, n)
            errs.append(rel(out, want))
            tri = qb.nvfp4_linear(x.reshape(-1, k), w, bias, out_dtype=torch.float32, backend="triton")
            ref = qb.nvfp4_linear(x.reshape(-1, k), w, bias, out_dtype=torch.float32, backend="reference")
            errs += [rel(tri, want.reshape(-1, n)), rel(ref, want.reshape(-1, n))]
            errs.append(rel(nvfp4_linear_decoded(x, w, out_dtype=torch.float32), want - bias.double()))
        x, w = heavy((40, 96), 62)[:, ::2], nv.quantize(heavy((24, 48), 63))  # non-contiguous x, K = 48
        bias = torch.randn(24, generator=_gen(64)).to(torch.bfloat16)  # the bias's own dtype, added in float32
        want = nv.quantize(x).dequantize(torch.float64) @ w.dequantize(torch.float64).T + bias.double()
        errs.append(rel(nvfp4_linear_decoded(x, w, bias, out_dtype=torch.float32), want))
        empty = nvfp4_linear_decoded(torch.zeros(2, 0, 48), w, bias)
        assert empty.shape == (2, 0, 24) and empty.dtype == torch.bfloat16
        assert max(errs) < 1e-5, errs
        return max(errs)

    def backend_dispatch():
        x = heavy((32, 64), 23)
        q = qb.nvfp4_quantize(x, backend="triton")
        assert same_q(q, nv.quantize(x))
        w = qb.nvfp4_quantize(heavy((16, 64), 24), backend="triton")
        e = rel(qb.nvfp4_matmul(q, w, out_dtype=torch.float32, backend="triton"), ref_matmul(q, w))
        assert e < 1e-5, e
        return e

    def quant_per_row_global_scale():
        """One global scale per row (the NVFP4 KV cache's per-frame scale), broadcast over leading dims."""
        x = heavy((2, 3, 5, 48), 7, spread=3.0)
        for g in (nv.global_scale_from_amax(x.abs().amax(dim=(-2, -1), keepdim=True)),  # per (b, h): [2, 3, 1, 1]
                  nv.global_scale_from_amax(x.abs().amax(dim=-1, keepdim=True))):  # per row: [2, 3, 5, 1]
            r, t = nv.quantize(x, global_scale=g), kq.nvfp4_quantize_triton(x, global_scale=g)
            assert torch.equal(r.data, t.data) and torch.equal(r.scale.view(torch.uint8), t.scale.view(torch.uint8))
            assert torch.equal(r.global_scale, t.global_scale)
        try:
            kq.nvfp4_quantize_triton(x, global_scale=torch.ones(3, 1))
        except ValueError as exc:
            assert "broadcast" in str(exc)
        else:
            raise AssertionError("a global scale of the wrong shape was accepted")
        return "ok"

    return {f.__name__: f for f in (quant_random, quant_heavy_tailed, quant_ties, quant_special, quant_nonfinite,
                                    quant_per_row_global_scale,
                                    gemm_fp32, gemm_bf16_and_leading_dims, gemm_special, dequantize_exact,
                                    split_gemm, rs_gemm, decoded_gemm, decoded_gemm_tma, quantize_decoded,
                                    decoded_linear,
                                    backend_dispatch)}


INTERP_CHECKS = ("quant_random", "quant_heavy_tailed", "quant_ties", "quant_special", "quant_nonfinite",
                 "quant_per_row_global_scale",
                 "gemm_fp32", "gemm_bf16_and_leading_dims", "gemm_special", "dequantize_exact", "split_gemm",
                 "rs_gemm", "decoded_gemm", "decoded_gemm_tma", "quantize_decoded", "decoded_linear",
                 "backend_dispatch")


def _child_main() -> None:
    report = {}
    for name, fn in _interpreter_checks().items():
        try:
            report[name] = {"ok": True, "detail": fn()}
        except Exception as e:  # report every failure, not only the first
            report[name] = {"ok": False, "detail": f"{type(e).__name__}: {e}"}
    print(_MARK + json.dumps(report), flush=True)


@pytest.fixture(scope="module")
def interp_report() -> dict:
    try:
        import triton  # noqa: F401 (checks importability; importing triton alone does not decorate our kernels)
    except Exception as e:  # not installed, or broken
        pytest.skip(f"triton is not importable ({type(e).__name__}); pip install triton==3.6.0 to run the kernels "
                    "in its interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpreter-checks"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=root)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    pytest.fail(f"interpreter child failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("name", INTERP_CHECKS)
def test_interp(interp_report: dict, name: str) -> None:
    entry = interp_report[name]
    assert entry["ok"], entry["detail"]


# ------------------------------------------------------------------ native (Blackwell) operands, on CPU


def _swizzle_by_formula(s: torch.Tensor) -> torch.Tensor:
    r, c = s.shape
    rt, ct = -(-r // 128), -(-c // 4)
    out = torch.zeros(rt * ct * 512, dtype=s.dtype)
    for i in range(r):
        for j in range(c):
            tile = (i // 128) * ct + j // 4
            out[tile * 512 + (i % 32) * 16 + ((i % 128) // 32) * 4 + j % 4] = s[i, j]
    return out


@pytest.mark.parametrize("rows,cols", [(128, 4), (130, 6), (7, 3), (256, 192 // 16)])
def test_swizzle_scales_layout(rows: int, cols: int) -> None:
    s = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=_gen(rows * cols))
    flat = native.swizzle_scales(s)
    assert flat.shape == (-(-rows // 128) * 128 * -(-cols // 4) * 4,)
    assert torch.equal(flat, _swizzle_by_formula(s))
    assert torch.equal(native.unswizzle_scales(flat, rows, cols), s)
    e4 = native.swizzle_scales(s.view(torch.float8_e4m3fn))
    assert e4.dtype == torch.float8_e4m3fn and torch.equal(e4.view(torch.uint8), flat)


def test_swizzle_matches_torchao_to_blocked() -> None:
    utils = pytest.importorskip("torchao.prototype.mx_formats.utils")
    s = torch.randint(0, 256, (300, 10), dtype=torch.uint8, generator=_gen(0))
    assert torch.equal(native.swizzle_scales(s), utils.to_blocked(s))


def _emulated_scaled_mm(mat_a, mat_b, scale_a, scale_b, out_dtype=torch.float32, **_):
    """What torch._scaled_mm computes for NVFP4 operands, from the documented contract (independent decode)."""
    assert mat_a.dtype == torch.float4_e2m1fn_x2 and mat_b.dtype == torch.float4_e2m1fn_x2
    assert scale_a.dtype == torch.float8_e4m3fn and scale_b.dtype == torch.float8_e4m3fn
    assert mat_a.is_contiguous() and mat_b.t().is_contiguous()  # A row-major, B column-major
    m, k = mat_a.shape[0], mat_a.shape[1] * 2
    n = mat_b.shape[1]

    def decode(packed: torch.Tensor, flat_scale: torch.Tensor, rows: int) -> torch.Tensor:
        codes = nv.unpack_fp4(packed.view(torch.uint8))
        s = native.unswizzle_scales(flat_scale, rows, k // 16).float().repeat_interleave(16, dim=1)
        return nv.e2m1_decode(codes) * s

    return (decode(mat_a, scale_a, m) @ decode(mat_b.t(), scale_b, n).t()).to(out_dtype)


def test_native_operands_and_emulated_scaled_mm() -> None:
    a, b = nv.quantize(heavy((3, 50, 64), 30)), nv.quantize(heavy((40, 64), 31))
    mat_a, mat_b, sa, sb = native.native_operands(a, b)
    assert mat_a.shape == (150, 32) and mat_b.shape == (32, 40) and mat_b.stride() == (1, 32)
    assert sa.shape == (256 * 4,) and sb.shape == (128 * 4,)
    out = _emulated_scaled_mm(mat_a, mat_b, sa, sb) * a.global_scale * b.global_scale
    assert rel(out, ref_matmul(a, b).reshape(150, 40)) < 1e-6
    with pytest.raises(ValueError, match="K % 32"):
        native.native_operands(nv.quantize(heavy((4, 48), 32)), nv.quantize(heavy((4, 48), 33)))


def test_native_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = nv.quantize(heavy((20, 64), 34)), nv.quantize(heavy((12, 64), 35))
    with pytest.raises(RuntimeError, match="Blackwell"):
        qb.nvfp4_matmul(a, b, backend="native")  # CPU tensors: refused with the reason
    monkeypatch.setattr(native, "_require_blackwell", lambda device: None)
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    out = qb.nvfp4_matmul(a, b, out_dtype=torch.float32, backend="native")
    assert out.shape == (20, 12) and rel(out, ref_matmul(a, b)) < 1e-6


def test_default_backend_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert qb.default_backend(torch.device("cpu")) == "reference"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert qb.default_backend(torch.device("cuda")) == "native"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert qb.default_backend(torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="unknown backend"):
        qb.nvfp4_quantize(torch.randn(2, 16), backend="cutlass")
    with pytest.raises(ValueError, match="unknown impl"):
        q = nv.quantize(torch.randn(2, 16))
        qb.nvfp4_matmul(q, q, impl="magic")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises((ValueError, RuntimeError), match="CUDA|triton"):
            qb.nvfp4_quantize(torch.randn(2, 16), backend="triton")


def test_fp8_rowwise_dispatch_cpu() -> None:
    from longstream.quant import fp8

    x, w = heavy((32, 64), 36), heavy((48, 64), 37)
    xq, xs = fp8.quantize_rowwise(x)
    wq, ws = fp8.quantize_rowwise(w)
    ref = qb.fp8_matmul_rowwise(xq, xs, wq, ws, out_dtype=torch.float32, backend="reference")
    try:
        out = qb.fp8_matmul_rowwise(xq, xs, wq, ws, out_dtype=torch.float32, backend="triton")
    except RuntimeError as e:  # CPU rowwise _scaled_mm needs torch >= 2.13
        pytest.skip(str(e)[:200])
    assert rel(out, ref) < 1e-5


def test_decoded_gemm_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """TMA by default on compute capability 9.x and 10.x only (consumer Blackwell lacks the shared memory), and
    pointer loads for operands TMA cannot address; an explicit "tma" on those is an error, not a fallback."""
    pytest.importorskip("triton")
    from longstream.quant.kernels import nvfp4_gemm_decoded as d

    cuda = torch.device("cuda")
    for capability, want in (((9, 0), "tma"), ((10, 0), "tma"), ((12, 0), "pointer"), ((8, 9), "pointer")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert d.default_kernel(cuda) == want, capability
    assert d.default_kernel(torch.device("cpu")) == "pointer"
    aligned, b = torch.zeros(64, 96, dtype=torch.float16), torch.zeros(32, 96, dtype=torch.float16)
    shifted = torch.zeros(64, 100, dtype=torch.float16)[:, 1:97]  # 2-byte offset, 200-byte rows
    monkeypatch.setattr(d, "default_kernel", lambda device: "tma")
    assert d.choose_kernel(None, aligned, b) == "tma" and d.choose_kernel(None, shifted, b) == "pointer"
    assert d.choose_kernel("pointer", aligned, b) == "pointer"
    with pytest.raises(ValueError, match="16-byte aligned"):
        d.scaled_matmul(shifted, b, torch.ones(()), torch.ones(()), kernel="tma")
    with pytest.raises(ValueError, match="unknown kernel"):
        d.choose_kernel("wgmma", aligned, b)


# ------------------------------------------------------------------ GPU: the same at the 5B model's sizes


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((7040, 3072), torch.bfloat16), ((1024, 14336), torch.float32),
                                         ((3, 640, 3072), torch.float16)])
def test_gpu_quantize_bit_exact(shape, dtype) -> None:
    from longstream.quant.kernels.nvfp4_quant import nvfp4_quantize_triton

    x = heavy(shape, 40, spread=1.5).to(dtype).cuda()
    x.view(-1, shape[-1])[7, :16] = 0.0
    assert same_q(nvfp4_quantize_triton(x), nv.quantize(x))
    g = torch.tensor(0.01, device="cuda")
    assert same_q(nvfp4_quantize_triton(x, global_scale=g), nv.quantize(x, global_scale=g))
    t = pow2_ties(256, 3072, 41).cuda()
    assert same_q(nvfp4_quantize_triton(t), nv.quantize(t))
    n = near_ties(256, 3072, 42).cuda()
    assert same_q(nvfp4_quantize_triton(n), nv.quantize(n))
    bad = x.clone()
    bad.view(-1)[5] = float("nan")
    with pytest.raises(ValueError):
        nvfp4_quantize_triton(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(7040, 3072, 3072), (1000, 14336, 3072), (512, 3072, 14336), (100, 200, 80)])
def test_gpu_gemm_vs_reference(m: int, n: int, k: int) -> None:
    from longstream.quant.kernels import nvfp4_gemm as kg

    a = nv.quantize(heavy((m, k), 43).cuda())
    b = nv.quantize(heavy((n, k), 44, spread=0.5).cuda())
    ref = ref_matmul(a, b)
    out = kg.nvfp4_matmul_triton(a, b, out_dtype=torch.float32)  # autotuned, inline-PTX decode
    assert rel(out, ref) < 1e-3
    plain = kg.nvfp4_matmul_triton(a, b, out_dtype=torch.float32, decode_asm=False,
                                   config=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8,
                                               num_stages=3))
    assert rel(plain, ref) < 1e-3
    bf = qb.nvfp4_matmul(a, b, backend="triton")
    assert bf.dtype == torch.bfloat16 and rel(bf, ref) < 1e-2
    assert rel(qb.nvfp4_matmul(a, b, out_dtype=torch.float32, backend="triton", impl="split"), ref) < 1e-2
    from longstream.quant.kernels.nvfp4_gemm_rs import nvfp4_matmul_rs

    assert rel(nvfp4_matmul_rs(a, b, out_dtype=torch.float32), ref) < 1e-3  # inline-PTX decode, GPU tiles
    decoded = qb.nvfp4_matmul(a, b, out_dtype=torch.float32, backend="triton", impl="decoded")  # autotuned
    assert rel(decoded, ref) < 1e-3


@pytest.mark.gpu
def test_gpu_quantize_decoded_and_linear() -> None:
    """The activation side of impl "decoded" bit-exact at the 5B model's size; the W4A4 linear (default impl)
    against the float64 math on the quantized operands."""
    from longstream.quant.kernels.nvfp4_quant import nvfp4_quantize_decoded_triton

    x = heavy((7040, 3072), 48, spread=1.5).to(torch.bfloat16).cuda()
    d, g = nvfp4_quantize_decoded_triton(x)
    q = nv.quantize(x)
    assert torch.equal(d, nv.dequantize(q.data, q.scale, 1.0, dtype=torch.float16))
    assert torch.equal(g.view(torch.int32), q.global_scale.reshape(()).view(torch.int32))
    w = nv.quantize(heavy((3072, 3072), 49, spread=0.5).cuda())
    bias = torch.randn(3072, generator=_gen(50)).cuda()
    want = q.dequantize(torch.float64) @ w.dequantize(torch.float64).T + bias.double()
    assert rel(qb.nvfp4_linear(x, w, bias, out_dtype=torch.float32, backend="triton"), want) < 1e-5
    out = qb.nvfp4_linear(x, w, bias, backend="triton")
    assert out.dtype == torch.bfloat16 and rel(out, want) < 4e-3
    from longstream.quant.kernels.nvfp4_gemm_decoded import nvfp4_linear_decoded

    assert rel(nvfp4_linear_decoded(x, w, bias, out_dtype=torch.float32, kernel="pointer"), want) < 1e-5


@pytest.mark.gpu
def test_gpu_dequantize_and_fp8_dispatch() -> None:
    from longstream.quant import fp8
    from longstream.quant.kernels import nvfp4_gemm as kg

    q = nv.quantize(heavy((2048, 3072), 45).cuda())
    d = kg.nvfp4_dequantize_triton(q, dtype=torch.float32, global_scale=q.global_scale)
    assert torch.equal(d, q.dequantize(torch.float32))
    x, w = heavy((1024, 3072), 46).cuda(), heavy((512, 3072), 47).cuda()
    xq, xs = fp8.quantize_rowwise(x)
    wq, ws = fp8.quantize_rowwise(w)
    ref = qb.fp8_matmul_rowwise(xq, xs, wq, ws, out_dtype=torch.float32, backend="reference")
    assert rel(qb.fp8_matmul_rowwise(xq, xs, wq, ws, out_dtype=torch.float32, backend="triton"), ref) < 3e-3


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    _child_main()
