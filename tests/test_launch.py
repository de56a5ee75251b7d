"""The cached launch path's decisions (nf4_explorer/_launch.py), checked without a GPU: which calls may
reuse a cached launcher and when Triton's own launch must run instead. The launches themselves are
checked on a GPU in test_gpu.py."""

import pytest
import torch

import nf4_explorer
from nf4_explorer import _launch
from nf4_explorer._format import prepare


@pytest.fixture
def args(device):
    weight = torch.randn(8, 128, dtype=torch.bfloat16, device=device)
    packed, state = nf4_explorer.quantize(weight, blocksize=64, double_quant=True)
    return prepare(packed, state, None)


CONFIG = {"WORDS": 128, "TABLE_IN_REGISTERS": False, "num_warps": 2}


def _key(args, pointers, config=CONFIG):
    """The cache key of a launch of ``args`` whose packed, absmax, code2, absmax2, offset and out
    sit at ``pointers`` (the table at an aligned address)."""
    arguments = args.kernel_arguments()
    runtime = arguments.runtime
    values = [*pointers[:5], 4096, pointers[5], *runtime[7:]]
    return _launch._ready_key("word_unpack", runtime, values, config, 0, arguments.constexprs)


def test_aligned_pointers_share_one_key_misaligned_get_none(args):
    if not _launch._FAST_LAUNCH_OK[0]:
        pytest.skip("this Triton has no fast launch path")
    aligned = (4096, 8192, 12288, 16384, 20480, 24576)
    other_aligned = tuple(p + (1 << 20) for p in aligned)
    assert _key(args, aligned) is not None
    assert _key(args, aligned) == _key(args, other_aligned), "new buffers of the same problem must reuse the launcher"
    for i in range(6):
        misaligned = tuple(p + 4 * (j == i) for j, p in enumerate(aligned))
        assert _key(args, misaligned) is None, f"pointer {i} off 16-byte alignment must take Triton's launch"


def test_key_separates_configs_sizes_and_dtypes(args, device):
    if not _launch._FAST_LAUNCH_OK[0]:
        pytest.skip("this Triton has no fast launch path")
    pointers = (4096,) * 6
    base = _key(args, pointers)
    assert _key(args, pointers, {**CONFIG, "WORDS": 256}) != base
    assert _key(args, pointers, {**CONFIG, "maxnreg": 168}) != base, "a register cap compiles another kernel"
    weight = torch.randn(8, 256, dtype=torch.bfloat16, device=device)
    wider = prepare(*nf4_explorer.quantize(weight, blocksize=64, double_quant=True), None)
    assert _key(wider, pointers) != base
    half = prepare(*nf4_explorer.quantize(torch.randn(8, 128, dtype=torch.float16, device=device)), None)
    assert _key(half, pointers) != base
    # Same sizes and dtypes, another blocksize or quant type: another compiled kernel.
    weight = torch.randn(8, 128, dtype=torch.bfloat16, device=device)
    for other in (dict(blocksize=32), dict(quant_type="fp4")):
        assert _key(prepare(*nf4_explorer.quantize(weight, double_quant=True, **other), None), pointers) != base, other


def test_launch_hooks_turn_the_cached_launch_off():
    knobs = pytest.importorskip("triton").knobs
    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton has no HookChain launch hooks")
    assert _launch._no_hook(None)
    assert _launch._no_hook(chain)
    hook = lambda metadata: None  # noqa: E731
    chain.add(hook)
    try:
        assert not _launch._no_hook(chain)
    finally:
        chain.remove(hook)
    assert not _launch._no_hook(hook), "a plain callable (older Triton) is a hook"


def test_launch_parameters_pass_maxnreg_only_where_a_config_sets_it():
    assert _launch.launch_parameters({"BLOCK": 64}) == {"num_warps": 4, "num_stages": 1}
    assert _launch.launch_parameters({"BLOCK": 64, "num_warps": 8, "num_stages": 2, "maxnreg": 168}) == {
        "num_warps": 8, "num_stages": 2, "maxnreg": 168}
    assert "maxnreg" in _launch.LAUNCH_PARAMS, "maxnreg must not reach the kernel as a constexpr"
