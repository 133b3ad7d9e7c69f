"""Shared fixtures. Root/BPF tests skip (with the reason printed) only where the machine
cannot run them; `make test` runs as root, so CI runs them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from netlab import Lab, skip_unless_root_bpf

FACTS_DIR = Path(__file__).parent / "facts"


@pytest.fixture
def root_bpf() -> None:
    skip_unless_root_bpf("root BPF test")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Test hosts for one module, removed at its end."""
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()
