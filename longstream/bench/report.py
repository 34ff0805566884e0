"""The text table of `longstream bench e2e` results (and helpers the other benchmarks share)."""

from __future__ import annotations

from typing import Any

from .breakdown import ATTENTION, CACHE_WRITE, LINEARS, VAE, consistent


def num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render_table(title: str, cells: list[list[str]]) -> list[str]:
    """`title`, then `cells` (header row first) as right-aligned columns two spaces apart."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return [title, *("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)]


COLUMNS = ("steps", "linear", "kv", "attn", "fused", "qkv", "async", "FPS", "DiT FPS", "TTFF s", "peak GiB", "lin ms",
           "attn ms", "cache ms", "VAE ms", "other ms", "lat err", "ceiling")


def format_table(result: dict[str, Any]) -> str:
    """The rows as a text table (times per chunk in ms), then one roofline line per (steps, linear, KV cache)."""
    r = result
    cells = [list(COLUMNS)]
    seen: dict[tuple, dict] = {}
    for row in r["rows"]:
        b, roof = row["breakdown_ms"], row["roofline"]
        decode = "-" if row["async_decode"] is None else ("on" if row["async_decode"] else "off")
        switches = ("on" if row.get(k) else "off" for k in ("fusion", "fuse_qkv"))
        cells.append([
            str(row["steps"]), row["linear"], row["kv_cache"], row.get("attention", "bf16"), *switches, decode,
            num(row["video_fps"], ".2f"),
            num(row["dit_fps"], ".2f"), num(row["first_frame_s"], ".3f"), num(row["peak_memory_gib"], ".2f"),
            *(num(b[k], ".1f") for k in (LINEARS, ATTENTION, CACHE_WRITE, VAE, "other")),
            num(row["latent_rel_error"], ".2e"), num(roof["ceiling_fps"], ".1f"),
        ])
        seen.setdefault((row["steps"], row["linear"], row["kv_cache"]), roof)
    title = (f"{r['device']}  {r['preset']}  {r['width']}x{r['height']}  chunk {r['chunk_frames']} / window "
             f"{r['window_frames']} / sink {r['sink_frames']} latent frames  {r['chunks']} chunks (measured from "
             f"chunk {r['first_measured_chunk'] + 1})  {r['dtype']}  "
             f"{'compile ' + r['compile'] if r['compile'] else 'eager'}")
    lines = render_table(title, cells)
    for i, row in enumerate(r["rows"], 1):
        b = row["breakdown_ms"]
        if not consistent(b):
            shared = f" ({b['shared_ids']} CPU events share an id)" if b.get("shared_ids") is not None else ""
            lines.append(f"note: row {i}'s breakdown is inconsistent: kernels tied to CPU events sum to "
                         f"{b['kernels'] - b['unlinked']:.0f} ms, all kernels to {b['kernels']:.0f} ms{shared}; "
                         f"its FPS and times do not depend on it")
    lines.append(f"roofline (DiT, per video frame; peaks {', '.join(f'{k} {v:g}' for k, v in r['peak_tflops'].items())}"
                 f" TFLOP/s, {r['peak_tbps']:g} TB/s):")
    for (steps, linear, kv), roof in seen.items():
        lines.append(
            f"  {steps} steps {linear}/{kv}: {roof['flops_per_frame'] / 1e12:.4g} TFLOP (linears "
            f"{roof['linear_flops_per_frame'] / 1e12:.4g}, attention {roof['attention_flops_per_frame'] / 1e12:.4g}), "
            f"{roof['bytes_per_frame'] / 1e9:.4g} GB -> {roof['compute_bound_fps']:.1f} FPS compute-bound, "
            f"{roof['memory_bound_fps']:.1f} memory-bound; ceiling {roof['ceiling_fps']:.1f} ({roof['bound']}), "
            f"DiT at {roof['dit_fraction']:.1%} of it"
        )
    return "\n".join(lines)
