"""Assertions shared by the tests."""

import pytest
import torch

import nf4_explorer


def skip_if_unavailable(name: str, device) -> None:
    """Skips the test where variant ``name`` cannot run on ``device`` (a Gluon variant off sm_80+)."""
    reason = nf4_explorer.get(name).unavailable_reason(device)
    if reason is not None:
        pytest.skip(reason)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """torch.equal, and on failure the number of mismatches and the first few with their indices."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if torch.equal(actual, expected):
        return
    a, e = actual.reshape(-1).float().cpu(), expected.reshape(-1).float().cpu()
    bad = ~((a == e) | (a.isnan() & e.isnan()))
    idx = bad.nonzero().reshape(-1)[:8].tolist()
    sample = ", ".join(f"[{i}] {a[i].item()!r} != {e[i].item()!r}" for i in idx)
    raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ; first: {sample}")


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel fails to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
