"""Configs (dataclasses) and model presets.

A preset bundles the transformer shape, the VAE compression factors, the streaming defaults and the video
resolution. Figures for the Wan presets come from the public Wan2.1/2.2 configs and LongLive-2.0's inference
configs; `embedded` is the small model shipped with this project, `tiny` a smaller random-weight one for tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LongstreamError


class ConfigError(LongstreamError):
    """A configuration that cannot work (bad value, impossible combination)."""


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a Wan2.x DiT; field names mirror diffusers' `WanTransformer3DModel` config where they exist."""

    num_attention_heads: int
    attention_head_dim: int
    num_layers: int
    ffn_dim: int
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def __post_init__(self) -> None:
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise ConfigError(f"attention_head_dim must be even and >= 6, got {self.attention_head_dim}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        for name in ("num_attention_heads", "num_layers", "ffn_dim", "in_channels", "out_channels", "text_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class StreamConfig:
    """Chunk-by-chunk generation settings (all lengths in latent frames).

    `window_frames` counts every key a query may see: the sink frames, recent history and the query's own
    chunk (LongLive's `local_attn_size`). `shot_rope_offset` is the extra RoPE distance put between shots.
    """

    chunk_frames: int = 8
    window_frames: int = 32
    sink_frames: int = 8
    multi_shot_sink: bool = True
    shot_rope_offset: float = 8.0
    timestep_shift: float = 5.0
    steps: int = 4
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.chunk_frames <= 0:
            raise ConfigError(f"chunk_frames must be positive, got {self.chunk_frames}")
        if self.sink_frames < 0:
            raise ConfigError(f"sink_frames must be >= 0, got {self.sink_frames}")
        if self.window_frames < self.sink_frames + self.chunk_frames:
            raise ConfigError(
                f"window_frames ({self.window_frames}) must hold the sink ({self.sink_frames}) "
                f"and one chunk ({self.chunk_frames})"
            )
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")


@dataclass(frozen=True)
class VAEConfig:
    """Compression factors of the video VAE (causal: F video frames -> 1 + (F - 1) / temporal latents)."""

    kind: str
    z_dim: int
    spatial: int
    temporal: int = 4


@dataclass(frozen=True)
class Preset:
    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    stream: StreamConfig = field(default_factory=StreamConfig)
    height: int = 704
    width: int = 1280
    fps: int = 24

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Latent (h, w) for a video size; raises ConfigError when VAE and patch size cannot divide it."""
        height = self.height if height is None else height
        width = self.width if width is None else width
        step = self.vae.spatial * self.transformer.patch_size[1]
        step_w = self.vae.spatial * self.transformer.patch_size[2]
        if height <= 0 or width <= 0 or height % step or width % step_w:
            raise ConfigError(
                f"resolution {width}x{height} is not possible for preset {self.name}: width and height must be "
                f"positive multiples of {step_w} and {step} (VAE x{self.vae.spatial}, patch "
                f"{self.transformer.patch_size[2]}x{self.transformer.patch_size[1]})"
            )
        return height // self.vae.spatial, width // self.vae.spatial

    def tokens_per_frame(self, height: int | None = None, width: int | None = None) -> int:
        lh, lw = self.latent_size(height, width)
        return (lh // self.transformer.patch_size[1]) * (lw // self.transformer.patch_size[2])


PRESETS: dict[str, Preset] = {
    "wan2.2-ti2v-5b": Preset(
        name="wan2.2-ti2v-5b",
        transformer=TransformerConfig(
            num_attention_heads=24, attention_head_dim=128, num_layers=30, ffn_dim=14336,
            in_channels=48, out_channels=48, text_dim=4096,
        ),
        vae=VAEConfig(kind="wan2.2", z_dim=48, spatial=16),
        stream=StreamConfig(chunk_frames=8, window_frames=32, sink_frames=8, shot_rope_offset=8.0),
        height=704, width=1280, fps=24,
    ),
    "wan2.1-t2v-1.3b": Preset(
        name="wan2.1-t2v-1.3b",
        transformer=TransformerConfig(
            num_attention_heads=12, attention_head_dim=128, num_layers=30, ffn_dim=8960,
            in_channels=16, out_channels=16, text_dim=4096,
        ),
        vae=VAEConfig(kind="wan2.1", z_dim=16, spatial=8),
        stream=StreamConfig(chunk_frames=3, window_frames=12, sink_frames=3, shot_rope_offset=3.0),
        height=480, width=832, fps=16,
    ),
    # The embedded model (weights in longstream/assets/embedded/, trained by configs/embedded/).
    "embedded": Preset(
        name="embedded",
        transformer=TransformerConfig(
            num_attention_heads=4, attention_head_dim=48, num_layers=6, ffn_dim=768,
            in_channels=16, out_channels=16, text_dim=64,
        ),
        vae=VAEConfig(kind="tiny", z_dim=16, spatial=8),
        stream=StreamConfig(chunk_frames=2, window_frames=8, sink_frames=2, shot_rope_offset=2.0),
        height=128, width=128, fps=16,
    ),
    # Random-weight test model (same VAE and stream as the embedded one, a smaller transformer).
    "tiny": Preset(
        name="tiny",
        transformer=TransformerConfig(
            num_attention_heads=4, attention_head_dim=24, num_layers=4, ffn_dim=256,
            in_channels=16, out_channels=16, text_dim=64,
        ),
        vae=VAEConfig(kind="tiny", z_dim=16, spatial=8),
        stream=StreamConfig(chunk_frames=2, window_frames=8, sink_frames=2, shot_rope_offset=2.0),
        height=128, width=128, fps=16,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (tuples become lists), for YAML/JSON."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(obj))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a dict, with a clear error for unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = {"transformer": TransformerConfig, "vae": VAEConfig, "stream": StreamConfig}.get(f.name)
        if sub is not None and cls is Preset and isinstance(value, dict):
            value = from_dict(sub, value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad {cls.__name__}: {exc}") from None


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def load_yaml(cls: type, path: str | Path) -> Any:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(cls, data)
