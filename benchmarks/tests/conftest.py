"""Fixtures of the benchmarks' tests: a fresh seed per test case, as in tests/conftest.py."""

from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test case (from its id), so inputs are fresh for every case but a
    # failure reproduces.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
