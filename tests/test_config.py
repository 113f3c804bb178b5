"""Loading the configuration file: keys that are no longer settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import ConfigError, EdgeConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tailpost.toml"
    path.write_text(text)
    return path


def test_an_old_file_that_says_durable_still_loads(tmp_path: Path) -> None:
    path = write(tmp_path, '[edge]\naccept_mode = "durable"\nmax_recipients = 7\n')
    config = load_config(path)
    assert config.edge.max_recipients == 7
    assert not hasattr(config.edge, "accept_mode")
    assert "accept_mode" not in EdgeConfig.__dataclass_fields__


@pytest.mark.parametrize("mode", ['"discard"', '"fast"', "1"])
def test_any_other_accept_mode_is_refused(tmp_path: Path, mode: str) -> None:
    path = write(tmp_path, f"[edge]\naccept_mode = {mode}\n")
    with pytest.raises(ConfigError, match="accept_mode .* is no longer supported"):
        load_config(path)
