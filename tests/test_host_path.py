"""The host path's per-weight cache of validated facts (``_format.prepare_weight``): a repeated call
skips the checks, and a changed weight or state is never served from a stale entry."""

import pytest
import torch

import nf4_explorer
from nf4_explorer import _format
from helpers import assert_bit_equal


@pytest.fixture
def counted(monkeypatch):
    """Counts the full validations (``_format.prepare`` calls)."""
    calls = []
    original = _format.prepare

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_format, "prepare", counting)
    monkeypatch.setattr(_format, "_CHECKED", {})
    return calls


def test_a_repeated_call_is_validated_once(device, counted):
    packed, state = nf4_explorer.quantize(torch.randn(16, 128, device=device, dtype=torch.bfloat16), double_quant=True)
    first = nf4_explorer.dequantize(packed, state)
    second = nf4_explorer.dequantize(packed, state)
    x = torch.randn(3, 128, device=device, dtype=torch.bfloat16)
    nf4_explorer.linear(x, packed, state)
    assert len(counted) == 1
    assert_bit_equal(second, first)


def _fresh(device, rows=16, **kwargs):
    return nf4_explorer.quantize(torch.randn(rows, 128, device=device, dtype=torch.bfloat16), **kwargs)


CHANGES = {
    # name: what changes in place, given (packed, state) and another weight's (packed, state)
    "absmax replaced": lambda p, s, o: setattr(s, "absmax", o[1].absmax),
    "absmax given new data": lambda p, s, o: setattr(s.absmax, "data", o[1].absmax.clone()),
    "nested absmax replaced": lambda p, s, o: setattr(s.state2, "absmax", o[1].state2.absmax),
    "offset replaced": lambda p, s, o: setattr(s, "offset", o[1].offset),
    "packed given new data": lambda p, s, o: setattr(p, "data", o[0].clone()),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_weight_is_never_served_stale(device, change):
    packed, state = _fresh(device, double_quant=True)
    other = _fresh(device, double_quant=True)
    nf4_explorer.dequantize(packed, state)  # cached
    CHANGES[change](packed, state, other)
    expected = nf4_explorer.reference_dequantize(packed, state)
    assert_bit_equal(nf4_explorer.dequantize(packed, state), expected, change)


BREAKS = {
    # name: what breaks in place, given (packed, state) and a larger weight's; the error it must give
    "absmax of another size": (lambda p, s, o: setattr(s, "absmax", o[1].absmax), ValueError, "state.absmax has"),
    "absmax data of another dtype": (lambda p, s, o: setattr(s.absmax, "data", s.absmax.data.float()), TypeError,
                                     "must hold uint8 codes"),
    "nested absmax of another size": (lambda p, s, o: setattr(s.state2, "absmax", torch.cat((s.state2.absmax,) * 2)),
                                      ValueError, "state.state2.absmax must be"),
    "offset of two values": (lambda p, s, o: setattr(s, "offset", torch.cat((s.offset.view(1),) * 2)), ValueError,
                             "state.offset must be one"),
    "packed data of another size": (lambda p, s, o: setattr(p, "data", o[0].clone()), ValueError, "packed has"),
}


@pytest.mark.parametrize("change", list(BREAKS))
def test_a_broken_weight_is_checked_again(device, change):
    packed, state = _fresh(device, double_quant=True)
    larger = _fresh(device, rows=32, double_quant=True)
    breaks, error, fragment = BREAKS[change]
    nf4_explorer.dequantize(packed, state)  # cached
    breaks(packed, state, larger)
    with pytest.raises(error, match=fragment):
        nf4_explorer.dequantize(packed, state)
    with pytest.raises(error, match=fragment):
        nf4_explorer.linear(torch.randn(2, 128, device=device, dtype=torch.bfloat16), packed, state)


def test_a_non_contiguous_view_of_the_same_memory_is_copied(device):
    packed, state = _fresh(device, double_quant=False)
    n = state.absmax.numel()
    memory = torch.cat((state.absmax, state.absmax.flip(0)))
    state.absmax = memory[:n]
    nf4_explorer.dequantize(packed, state)  # cached: contiguous, at the memory's start
    state.absmax = memory[::2]  # same start, same size, strided: other values
    assert_bit_equal(nf4_explorer.dequantize(packed, state), nf4_explorer.reference_dequantize(packed, state))


def test_another_packed_weight_with_the_same_state(device):
    packed, state = _fresh(device, double_quant=True)
    other, _ = _fresh(device, double_quant=True)
    nf4_explorer.dequantize(packed, state)
    assert_bit_equal(nf4_explorer.dequantize(other, state), nf4_explorer.reference_dequantize(other, state))


def test_a_changed_shape_or_blocksize_is_checked_again(device):
    packed, state = _fresh(device, double_quant=True)
    nf4_explorer.dequantize(packed, state)
    state.blocksize = 128  # the absmax no longer fits: the checks run and say so
    with pytest.raises(ValueError, match="state.absmax has"):
        nf4_explorer.dequantize(packed, state)
    state.blocksize = 64
    state.shape = torch.Size((8, 256))  # same bytes, another shape: a valid weight, another output
    assert nf4_explorer.dequantize(packed, state).shape == (8, 256)
    state.shape = (8.0, 256.0)  # floats that equal the cached ints still get their error
    with pytest.raises(TypeError, match="state.shape must be"):
        nf4_explorer.dequantize(packed, state)


def test_a_non_contiguous_absmax_is_copied_every_call(device, counted):
    packed, state = _fresh(device, double_quant=False)
    wide = torch.stack((state.absmax, torch.full_like(state.absmax, float("nan"))), dim=1)
    expected = nf4_explorer.reference_dequantize(packed, state)
    state.absmax = wide[:, 0]  # same values, every other float
    for _ in range(2):
        assert_bit_equal(nf4_explorer.dequantize(packed, state), expected)
    assert len(counted) == 2  # validated (and copied) each time, never remembered
