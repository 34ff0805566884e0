"""The block's compiled elementwise steps equal their eager twins (GPU), and stay eager where they must."""

import warnings

import pytest
import torch

from longstream import fused
from longstream.model import elementwise as ew


def _inputs(device: str, dtype: torch.dtype, heads: int = 4, dim: int = 256) -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=dt)

    tokens = 3 * 40
    angles = torch.rand(tokens, dim // heads // 2, generator=g, device=device) * 6.28
    return dict(
        x=randn(2, 3, 40, dim) * 3 + 1, y=randn(2, 3, 40, dim),
        scale=randn(2, 3, 1, dim, dt=torch.float32), shift=randn(2, 3, 1, dim, dt=torch.float32),
        gate=randn(2, 3, 1, dim, dt=torch.float32), weight=randn(dim) + 1, bias=randn(dim),
        q=randn(2, tokens, dim) * 2, cos=angles.cos(), sin=angles.sin(), heads=heads,
    )


def _cases(a: dict) -> list:
    return [
        (ew.modulated_norm, (a["x"], a["scale"], a["shift"], 1e-6)),
        (ew.gated_residual, (a["x"], a["y"], a["gate"])),
        (ew.layer_norm, (a["x"], a["weight"], a["bias"], 1e-6)),
        (ew.layer_norm, (a["x"], None, None, 1e-6)),
        (ew.rms_norm_rope, (a["q"], a["weight"], 1e-6, a["heads"], a["cos"], a["sin"])),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-6)])
def test_compiled_steps_equal_eager(dtype, tol):
    """Same results up to rounding order: within tol of the output's largest value (bf16: two ulps there; Inductor
    may keep a float32 intermediate, e.g. the RMS-normed q, where eager rounds it to bf16)."""
    calls = fused._compiled.cache_info()
    with torch.no_grad():
        for fn, args in _cases(_inputs("cuda", dtype)):
            ref = fn(*args)
            out = fused.run(fn, *args)
            assert out.dtype == ref.dtype and out.shape == ref.shape
            assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max(), fn.__name__
    after = fused._compiled.cache_info()
    assert after.hits + after.misses == calls.hits + calls.misses + 5  # every case took the compiled path


def test_steps_stay_eager_on_cpu_with_grad_or_when_off(monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "_compiled", lambda fn: calls.append(fn) or fn)
    a = _inputs("cpu", torch.float32)
    with torch.no_grad():
        fused.run(ew.gated_residual, a["x"], a["y"], a["gate"])  # CPU: eager
    assert calls == []
    if torch.cuda.is_available():
        x = a["x"].cuda()
        fused.run(ew.gated_residual, x, a["y"].cuda(), a["gate"].cuda())  # autograd on: eager
        with torch.no_grad(), fused.fusion(False):
            fused.run(ew.gated_residual, x, a["y"].cuda(), a["gate"].cuda())
        assert calls == []
        with torch.no_grad():
            fused.run(ew.gated_residual, x, a["y"].cuda(), a["gate"].cuda())
        assert calls == [ew.gated_residual]


def test_eager_steps_match_float64_math():
    """The eager twins against the formulas in float64, to float32 precision (they compute in float32, as Wan does;
    the transformer tests compare the whole block with diffusers' Wan modules)."""
    a = _inputs("cpu", torch.float64)
    x, y = a["x"], a["y"]
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    norm = (x - mean) / torch.sqrt(var + 1e-6)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ew.modulated_norm(x, a["scale"], a["shift"], 1e-6),
                               norm * (1 + a["scale"]) + a["shift"], **close)
    torch.testing.assert_close(ew.layer_norm(x, a["weight"], a["bias"], 1e-6), norm * a["weight"] + a["bias"], **close)
    torch.testing.assert_close(ew.gated_residual(x, y, a["gate"]), x + y * a["gate"], **close)
    q, heads = a["q"], a["heads"]
    normed = (q / torch.sqrt(q.square().mean(-1, keepdim=True) + 1e-6) * a["weight"]).unflatten(-1, (heads, -1))
    even, odd = normed[..., 0::2], normed[..., 1::2]
    c, s = a["cos"][None, :, None].double(), a["sin"][None, :, None].double()
    rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2)
    out = ew.rms_norm_rope(q, a["weight"], 1e-6, heads, a["cos"], a["sin"])
    torch.testing.assert_close(out, rotated, **close)


def test_a_failed_compilation_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(fn):
        def call(*args):
            raise RuntimeError("no C compiler\nmore detail")
        return call

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(fused, "compiles", lambda x: True)
    monkeypatch.setattr(fused, "_FAILED", set())
    a = _inputs("cpu", torch.float32)
    with pytest.warns(UserWarning, match="compiling gated_residual failed \\(no C compiler\\)"):
        out = fused.run(ew.gated_residual, a["x"], a["y"], a["gate"])
    assert torch.equal(out, ew.gated_residual(a["x"], a["y"], a["gate"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the function stays eager
        fused.run(ew.gated_residual, a["x"], a["y"], a["gate"])


@pytest.mark.gpu
def test_fused_stream_equals_eager_stream_on_cuda():
    """A 2-shot stream of the tiny preset in bf16 (a shot switch re-caches): the compiled steps change the latents
    only by bf16 rounding."""
    from longstream.config import get_preset
    from longstream.model.transformer import CausalWanTransformer
    from longstream.pipeline.stream import ShotPlan, StreamingGenerator

    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = CausalWanTransformer(preset.transformer).to("cuda", torch.bfloat16).eval()
    texts = [torch.randn(1, 8, preset.transformer.text_dim, device="cuda") for _ in range(2)]

    def stream(enabled: bool) -> torch.Tensor:
        gen = StreamingGenerator(model, preset.stream, preset.latent_size(64, 64))
        shots = [ShotPlan(texts[0], 3), ShotPlan(texts[1], 2)]
        with torch.no_grad(), fused.fusion(enabled):
            chunks = gen.generate(shots, generator=torch.Generator().manual_seed(1))
            return torch.cat([c.latents.float() for c in chunks], dim=2)

    calls = fused._compiled.cache_info()
    out, ref = stream(True), stream(False)
    assert fused._compiled.cache_info().hits > calls.hits  # the fused run took the compiled path
    assert ref.abs().max() > 0.1
    assert (out - ref).norm() / ref.norm() < 2e-2


def test_inside_an_outer_compile_the_eager_twin_is_traced(monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "_compiled", lambda fn: calls.append(fn) or fn)
    monkeypatch.setattr(fused, "_ENABLED", [True])
    monkeypatch.setattr(fused, "COMPILED_DEVICES", ("cpu",))  # so that the CPU tensors below would qualify
    a = _inputs("cpu", torch.float32)
    outer = torch.compile(lambda x, y, g: fused.run(ew.gated_residual, x, y, g) * 2, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = outer(a["x"], a["y"], a["gate"])
    assert calls == []
    assert torch.equal(out, ew.gated_residual(a["x"], a["y"], a["gate"]) * 2)


def test_serialized_holds_the_compile_lock_of_run():
    """A torch.compile'd callable wrapped by `serialized` runs under the lock that `run`'s compiled calls take,
    so a worker thread's compiled steps wait while it traces (Dynamo is not thread-safe)."""
    seen = []

    def body(x, scale=1.0):
        seen.append(fused._DYNAMO.locked())
        return x * scale

    wrapped = fused.serialized(body)
    assert torch.equal(wrapped(torch.ones(3), scale=2.0), torch.full((3,), 2.0))
    assert seen == [True] and not fused._DYNAMO.locked() and wrapped.__name__ == "body"
