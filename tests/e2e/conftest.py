"""Fixtures of the e2e tier."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    """One output root for the e2e sweeps, so the bundled GGUF is dequantized to a float folder once."""
    return tmp_path_factory.mktemp("e2e-out")
