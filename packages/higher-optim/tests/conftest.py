"""Fixtures the optim tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def float64_default() -> Iterator[None]:
    """float64 as torch's default dtype for the test: torch keeps scalar state (ASGD's eta,
    NAdam's mu_product) in the default dtype, and hypergradient checks want float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
