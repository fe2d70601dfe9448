"""Shared fixtures: the real CS224N data folder and a tiny random-weight backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny import make_tiny_backbone

REPO = Path(__file__).resolve().parents[1]

# Two cores are shared by pytest and (in some tests) Ray workers.
torch.set_num_threads(1)


def data_dir() -> Path:
    return Path(os.environ.get("MTL_DATA_DIR", REPO.parent / "shared" / "data" / "cs224n"))


@pytest.fixture(autouse=True, scope="session")
def _session_cache_root(tmp_path_factory: pytest.TempPathFactory):
    """The project's caches (tokenized data, stage-1 encoders) in a folder of this session, not
    the user's ``~/.cache/mtl``: no test reads what an earlier session or run left there. Set
    before any test starts Ray, so that its workers inherit it."""
    old = os.environ.get("MTL_CACHE_DIR")
    os.environ["MTL_CACHE_DIR"] = str(tmp_path_factory.mktemp("mtl-cache"))
    yield
    if old is None:
        os.environ.pop("MTL_CACHE_DIR", None)
    else:
        os.environ["MTL_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    path = data_dir()
    if not (path / "ids-sst-train.csv").exists():
        pytest.fail(f"CS224N data not found at {path}; set MTL_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))
