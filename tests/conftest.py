"""Shared fixtures: seeding, the default model (loaded once) and a few corpus windows."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nbutils import data, models


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def model():
    return models.load_model()


@pytest.fixture(scope="session")
def windows(model) -> torch.Tensor:
    return data.corpus_windows(model, n_windows=48, window=32)
