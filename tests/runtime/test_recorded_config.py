"""The runtime trusts a manifest's recorded transformer_config only if it matches the fingerprint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tokprune.errors import ManifestError
from tokprune.models import fingerprint, tiny_transformer_config
from tokprune.pruning import Geometry
from tokprune.runtime.verify import transformer_config


def _manifest(recorded: dict) -> SimpleNamespace:
    cfg = tiny_transformer_config("sd3")
    geometry = Geometry.from_config(cfg, batch=2, latent_hw=(24, 24), text_tokens=93)
    data = {"transformer_config": recorded, "model": {"fingerprint": fingerprint(cfg), "name": "sd3-tiny"},
            "height": 48, "width": 48, "steps": 4, "budget": 0.5}
    return SimpleNamespace(data=data, geometry=geometry, directory="engines/x")


def test_recorded_config_is_used_with_the_engines_resolution():
    cfg = tiny_transformer_config("sd3")
    got = transformer_config(_manifest(dict(cfg)))
    assert got["sample_size"] == 24 != cfg["sample_size"]  # pipeline default = the exported resolution
    assert {k: v for k, v in got.items() if k != "sample_size"} == {k: v for k, v in cfg.items() if k != "sample_size"}


def test_tampered_recorded_config_is_refused():
    cfg = dict(tiny_transformer_config("sd3"), num_layers=7)
    with pytest.raises(ManifestError, match="recorded transformer_config"):
        transformer_config(_manifest(cfg))
