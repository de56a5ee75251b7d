"""Test set-up: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _isolated_dispatch(tmp_path, monkeypatch):
    """Every test starts with no memoized choices and reads tuned files only from its own tmp dir."""
    import nf4_explorer._dispatch as dispatch

    monkeypatch.setenv("NF4_EXPLORER_CONFIG_DIR", str(tmp_path / "tuned"))
    monkeypatch.delenv("NF4_EXPLORER_VARIANT", raising=False)
    dispatch.reset()
    yield
    dispatch.reset()
