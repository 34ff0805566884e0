"""Configs: presets, YAML round trip, clear errors."""

import pytest

from longstream.config import PRESETS, ConfigError, Preset, StreamConfig, get_preset, load_yaml, save_yaml


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_yaml(tmp_path, name):
    save_yaml(get_preset(name), tmp_path / "p.yaml")
    assert load_yaml(Preset, tmp_path / "p.yaml") == get_preset(name)


def test_5b_preset_facts():
    p = get_preset("wan2.2-ti2v-5b")
    assert p.transformer.dim == 3072 and p.latent_size() == (44, 80) and p.tokens_per_frame() == 880
    assert (p.stream.chunk_frames, p.stream.window_frames, p.stream.sink_frames) == (8, 32, 8)


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("wan3")
    with pytest.raises(ConfigError, match="must hold the sink"):
        StreamConfig(chunk_frames=8, window_frames=12, sink_frames=8)
    (tmp_path / "bad.yaml").write_text("name: x\nspeed: 3\n")
    with pytest.raises(ConfigError, match="unknown Preset keys: speed"):
        load_yaml(Preset, tmp_path / "bad.yaml")
