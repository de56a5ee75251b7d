"""The linear family: every registered linear variant against x and the dequantized weight in
float64 (the family's tolerance: twice cuBLAS's error plus one ulp), linear_dequantize bit-identical
to F.linear, autograd as bitsandbytes' MatMul4Bit.backward, the custom op under torch.compile, and the
dispatcher by M bucket. On a machine without a GPU this runs in Triton's interpreter, tiny shapes."""

import json

import pytest
import torch

import nf4_explorer
from nf4_explorer import _dispatch, tuning
from helpers import assert_bit_equal

# The linear variants this machine runs (a Gluon variant needs an NVIDIA GPU, not the interpreter).
LINEAR = nf4_explorer.names("cuda" if torch.cuda.is_available() else "cpu", family="linear")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _problem(n, k, m, dtype, device, blocksize=64, double_quant=True, quant_type="nf4", bias=False, lead=()):
    weight = torch.randn(n, k, dtype=dtype, device=device)
    packed, state = nf4_explorer.quantize(weight, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
    x = torch.randn(*lead, m, k, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    return x, packed, state, b


def _configs(name, blocksize):
    """The default config and up to three more of the variant's space: its first, middle and last
    (the space's last values, e.g. ``linear_lut_gemm``'s SWAP, appear in the last half only)."""
    variant = nf4_explorer.get(name)
    configs = variant.configs(blocksize)
    default = variant.default_config(blocksize)
    others = [c for c in configs if c != default]
    return [default] + [others[i] for i in sorted({0, len(others) // 2, len(others) - 1})] if others else [default]


def _check(name, config, x, packed, state, bias):
    refusal = nf4_explorer.get(name).accepts(tuning.prepare_linear(x, packed, state, bias))
    if refusal is not None:
        pytest.skip(refusal)
    out = nf4_explorer.linear(x, packed, state, bias, variant=name, config=config)
    assert out.shape == (*x.shape[:-1], state.shape[0]) and out.dtype == x.dtype
    if name == "linear_dequantize":
        expected = torch.nn.functional.linear(x, nf4_explorer.dequantize(packed, state).to(x.dtype), bias)
        assert_bit_equal(out, expected, name)
        return
    reference = tuning.reference_linear(x, packed, state, bias)
    bound = tuning.tolerance(x, packed, state, bias, reference=reference)
    error = (out.double() - reference).abs().max().item()
    assert error <= bound, f"{name} {config}: max error {error:.3g} over the bound {bound:.3g}"


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_variant_within_the_contract(name, dtype, device):
    from triton.runtime.errors import OutOfResources

    x, packed, state, bias = _problem(48, 128, 3, dtype, device, bias=True)
    ran = 0
    for config in _configs(name, 64):
        try:
            _check(name, config, x, packed, state, bias)
            ran += 1
        except OutOfResources:
            # The spaces' shared-memory rule (fits_shared_memory) counts 16-bit tiles; with a float32
            # x some configs need twice that (linear_tiled's last: 256 KB on an H200, which has 227
            # KB). A tune drops them on the card; no other config may fail so.
            if dtype != torch.float32:
                raise
    assert ran, f"{name}: no config ran"


@pytest.mark.parametrize("name", LINEAR)
def test_float16_x_on_a_bfloat16_weight_within_the_contract_or_declined(name, device):
    """A float16 x on a weight quantized from bfloat16 (state.dtype): the contract's reference rounds
    the weight to bfloat16 first. The register-LUT variants that decode on x's finer float16 grid were
    ~2x over the bound at K = 4096 and decline it; linear_gemv_gluon, linear_mma_gemv and linear_wgmma
    decode it from tables of each block's bfloat16 weights (GPU only) and must be within it at every
    config tried."""
    weight = torch.randn(32, 4096, dtype=torch.bfloat16, device=device) * 0.02
    packed, state = nf4_explorer.quantize(weight, blocksize=64)
    for m in (2, 16):
        x = torch.randn(m, 4096, dtype=torch.float16, device=device)
        for config in _configs(name, 64):
            _check(name, config, x, packed, state, None)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["linear_gemv_gluon", "linear_mma_gemv", "linear_wgmma"])
@pytest.mark.parametrize("fmt", [dict(quant_type="nf4", double_quant=True), dict(quant_type="fp4", double_quant=False)],
                         ids=["nf4", "fp4"])
def test_block_tables_give_the_dequantized_weight(name, fmt):
    """A float16 x on a bfloat16 weight through the block tables: x one-hot in column c gives column c
    of the weight itself, so every decoded weight must be dequantize's bfloat16 bits as float16
    (Tensor.to's), for rows whose scales run from float16's subnormals to its top binades."""
    torch.manual_seed(0)
    n, k = 256, 2048
    scales = 2.0 ** torch.randint(-24, 12, (n, 1), dtype=torch.float32)
    weight = (torch.randn(n, k) * scales).to(device="cuda", dtype=torch.bfloat16)
    packed, state = nf4_explorer.quantize(weight, blocksize=64, **fmt)
    weights = nf4_explorer.dequantize(packed, state).to(torch.float16)
    columns = torch.randperm(k, device="cuda")[:64]
    x = torch.zeros(64, k, dtype=torch.float16, device="cuda")
    x[torch.arange(64, device="cuda"), columns] = 1.0
    for config in _configs(name, 64):
        for m in (1, 3, 16, 64):
            out = nf4_explorer.linear(x[:m], packed, state, variant=name, config=config)
            assert_bit_equal(out, weights[:, columns[:m]].T.contiguous(), f"{name} {config} M = {m}")


def test_the_dispatcher_keeps_a_float16_x_on_a_bfloat16_weight_within_the_contract(device):
    weight = torch.randn(32, 4096, dtype=torch.bfloat16, device=device) * 0.02
    packed, state = nf4_explorer.quantize(weight, blocksize=64)
    x = torch.randn(2, 4096, dtype=torch.float16, device=device)
    reference = tuning.reference_linear(x, packed, state)
    error = (nf4_explorer.linear(x, packed, state).double() - reference).abs().max().item()
    assert error <= tuning.tolerance(x, packed, state, reference=reference)


@pytest.mark.parametrize("pair", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
                                  (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                  (torch.float32, torch.float16), (torch.float16, torch.float32)], ids=str)
def test_linear_dequantize_cast_is_tensor_to(pair, device):
    """linear_dequantize's cast of the dequantized weight to x's dtype gives Tensor.to's bits: values
    of every binade, past float16's range, subnormal, infinite, signed zeros; the output poisoned first."""
    from nf4_explorer.linear_dequantize import cast_kernel

    source, target = pair
    scales = torch.tensor([1e-9, 1e-7, 6e-5, 1e-3, 1.0, 300.0, 6e4, 7e4, 1e6, 1e30], device=device)
    values = torch.randn(1 << 20, device=device) * scales[torch.randint(0, len(scales), (1 << 20,), device=device)]
    values[:6] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 65504.0, 65520.0])
    src = values.to(source)
    out = torch.full(src.shape, float("nan"), dtype=target, device=device)
    cast_kernel[(src.numel() // 4096,)](src, out, src.numel(), BLOCK=4096)
    assert_bit_equal(out, src.to(target), f"cast {source} -> {target}")


@pytest.mark.parametrize("split", [2, 4, 8])
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_split_k_within_the_contract(split, bias, device):
    """linear_lut_gemm's split-K: K = 384 is 6 steps of WORDS = 8 words, run in splits of 3, 3 steps;
    2, 2, 2, 0; and 1 x 6, 0, 0 (empty runs write zeros); the bias is added once, after the sum; two
    calls give the same bits (the planes are added in a fixed order)."""
    config = {**nf4_explorer.get("linear_lut_gemm").default_config(64), "BLOCK_M": 16, "BLOCK_N": 64, "WORDS": 8,
              "SPLIT_K": split, "num_warps": 4}
    x, packed, state, b = _problem(80, 384, 20, torch.bfloat16, device, bias=bias)
    _check("linear_lut_gemm", config, x, packed, state, b)
    first = nf4_explorer.linear(x, packed, state, b, variant="linear_lut_gemm", config=config)
    assert_bit_equal(nf4_explorer.linear(x, packed, state, b, variant="linear_lut_gemm", config=config), first,
                     "split-K twice")


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("fmt", [dict(quant_type="fp4", double_quant=False, blocksize=32),
                                 dict(quant_type="nf4", double_quant=True, blocksize=128),
                                 dict(quant_type="fp4", double_quant=True, blocksize=64)], ids=str)
def test_formats_and_leading_shapes(name, fmt, device):
    x, packed, state, _ = _problem(40, 256, 5, torch.bfloat16, device, lead=(2,), **fmt)
    _check(name, nf4_explorer.get(name).default_config(fmt["blocksize"]), x, packed, state, None)


def test_k_not_in_whole_blocks(device):
    """K = 100 with blocksize 32: rows straddle quantization blocks. The GEMV refuses (with the
    fix), the tiled kernel takes its per-element path, dequantize + cuBLAS takes anything."""
    x, packed, state, bias = _problem(24, 100, 4, torch.float16, device, blocksize=32, bias=True)
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        nf4_explorer.linear(x, packed, state, variant="linear_gemv")
    # Small tiles: the per-element path needs ~3x the shared memory fits_shared_memory counts (the
    # default config asks for 442 KB on the H200, which has 227 KB; a tune prunes such configs).
    small = {**nf4_explorer.get("linear_tiled").default_config(32), "BLOCK_M": 16, "BLOCK_N": 32, "num_stages": 2}
    _check("linear_tiled", small, x, packed, state, bias)
    _check("linear_dequantize", {}, x, packed, state, bias)
    assert nf4_explorer.explain_linear(x[:1], packed, state).variant == "linear_dequantize"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_is_bitsandbytes_op_for_op(dtype, device):
    """grad_x = grad @ dequantize(W).to(grad.dtype), grad_bias = grad.sum(0): MatMul4Bit.backward."""
    x, packed, state, bias = _problem(32, 128, 6, dtype, device, bias=True)
    x.requires_grad_(True)
    bias.requires_grad_(True)
    grad = torch.randn(6, 32, dtype=dtype, device=device)
    out = nf4_explorer.linear(x, packed, state, bias)
    grad_x, grad_bias = torch.autograd.grad(out, (x, bias), grad)
    weight = nf4_explorer.reference_dequantize(packed, state)
    assert_bit_equal(grad_x, torch.matmul(grad, weight.to(grad.dtype)), "grad x")
    assert_bit_equal(grad_bias, grad.sum(0, dtype=bias.dtype), "grad bias")
    with torch.no_grad():
        assert_bit_equal(out.detach(), nf4_explorer.linear(x, packed, state, bias), "forward with and without autograd")


def test_torch_compile_fullgraph(device):
    x, packed, state, bias = _problem(32, 128, 3, torch.bfloat16, device, bias=True)

    def layer(x):
        return torch.relu(nf4_explorer.linear(x, packed, state, bias))

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    assert_bit_equal(compiled(x), layer(x), "compiled vs eager")


def test_fake_op_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, packed, state, _ = _problem(16, 64, 3, torch.float16, "cpu", lead=(2,))
    with FakeTensorMode() as mode:
        s2 = state.state2
        fake_state = nf4_explorer.QuantState(
            absmax=mode.from_tensor(state.absmax), shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
            quant_type=state.quant_type, offset=mode.from_tensor(state.offset),
            state2=nf4_explorer.QuantState(absmax=mode.from_tensor(s2.absmax), shape=s2.shape, dtype=s2.dtype,
                                           blocksize=s2.blocksize, code=mode.from_tensor(s2.code)))
        fake = nf4_explorer._op.call_linear_op(mode.from_tensor(x), mode.from_tensor(packed), fake_state, None)
    assert fake.shape == (2, 3, 16) and fake.dtype == torch.float16


@pytest.mark.parametrize("bad, error, fragment", [
    (dict(x=torch.randn(3, 65)), ValueError, "last dimension must be 64"),
    (dict(x=torch.randn(3, 64, dtype=torch.float64)), TypeError, "float16, bfloat16 or float32"),
    (dict(bias=torch.randn(7)), ValueError, "pass a [16] bias"),
    (dict(bias=torch.randn(16, dtype=torch.float16)), TypeError, "needs one dtype"),
    (dict(x="x"), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_one_clear_error(bad, error, fragment, device):
    _, packed, state, _ = _problem(16, 64, 3, torch.float32, device)
    args = {"x": torch.randn(3, 64), "bias": None, **bad}
    args = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        nf4_explorer.linear(args["x"], packed, state, args["bias"])


def test_variant_of_the_other_family_is_refused(device):
    x, packed, state, _ = _problem(16, 64, 3, torch.float32, device)
    with pytest.raises(ValueError, match="is a dequantize variant, not a linear one"):
        nf4_explorer.linear(x, packed, state, variant="word_unpack")


def _tuned_entry(shape, m, variant, config=None, out_dtype="bfloat16"):
    """A current linear entry of a tuned file (the variant's default config unless ``config``)."""
    return {"family": "linear", "quant_type": "nf4", "blocksize": 64, "double_quant": True, "out_dtype": out_dtype,
            "size_bucket": tuning.size_bucket(shape[0] * shape[1]), "shape": list(shape), "m_bucket": m,
            "variant": variant, "config": config if config is not None else nf4_explorer.get(variant).default_config(64),
            "time_us": 1.0, "triton_version": tuning.triton_minor(), "kernel_hash": tuning.kernel_hash(variant)}


def _fake_gpu_file(monkeypatch, tmp_path, entries):
    """Makes this machine a "Fake GPU 9000" whose tuned file holds ``entries``; returns a function
    that rewrites the file with other entries (the dispatcher forgets what it read)."""
    monkeypatch.setattr(tuning, "device_name", lambda device: "Fake GPU 9000")
    monkeypatch.setattr(nf4_explorer._cache, "device_name", lambda device: "Fake GPU 9000")
    directory = tmp_path / "tuned"
    monkeypatch.setenv("NF4_EXPLORER_CONFIG_DIR", str(directory))
    directory.mkdir()

    def write(entries):
        (directory / f"{tuning.slug('Fake GPU 9000')}.json").write_text(json.dumps({"schema_version": 2,
                                                                                   "entries": entries}))
        _dispatch.reset()

    write(entries)
    return write


def test_dispatcher_picks_by_m_bucket(monkeypatch, tmp_path, device):
    """Tuned linear entries beside dequantize ones: the nearest M bucket first, the exact shape among
    those, else the nearest shape; the built-in default by M where nothing is tuned."""
    entries = [_tuned_entry([32, 128], 1, "linear_gemv"), _tuned_entry([32, 128], 64, "linear_tiled"),
               _tuned_entry([64, 128], 4096, "linear_dequantize")]
    rewrite = _fake_gpu_file(monkeypatch, tmp_path, entries)
    x, packed, state, _ = _problem(32, 128, 1, torch.bfloat16, device)
    choose = lambda m: nf4_explorer.explain_linear(torch.randn(m, 128, dtype=torch.bfloat16, device=device),  # noqa: E731
                                                   packed, state)
    assert (choose(1).variant, choose(1).reason) == ("linear_gemv", "tuned (exact)")
    assert (choose(50).variant, choose(50).reason) == ("linear_tiled", "tuned (exact)")  # bucket 64
    assert (choose(300).variant, choose(300).reason) == ("linear_tiled", "tuned (nearest M bucket)")
    # M = 2000: the exact shape was tuned at M <= 64 only; another shape's M = 4096 entry is nearer.
    assert (choose(2000).variant, choose(2000).reason) == ("linear_dequantize", "tuned (nearest shape)")
    _, other_packed, other_state, _ = _problem(64, 128, 1, torch.bfloat16, device)
    nearest = nf4_explorer.explain_linear(torch.randn(2, 128, dtype=torch.bfloat16, device=device), other_packed,
                                          other_state)
    assert (nearest.variant, nearest.reason) == ("linear_gemv", "tuned (nearest shape)")
    # float16 x (on a float16 weight), nothing tuned for float16: the bfloat16 entries, by the same order.
    _, packed16, state16, _ = _problem(32, 128, 1, torch.float16, device)
    fp16 = lambda m: nf4_explorer.explain_linear(torch.randn(m, 128, dtype=torch.float16, device=device),  # noqa: E731
                                                 packed16, state16)
    assert (fp16(1).variant, fp16(1).reason) == ("linear_gemv", "tuned (other 16-bit dtype)")
    assert (fp16(50).variant, fp16(50).reason) == ("linear_tiled", "tuned (other 16-bit dtype)")
    assert "a bfloat16 entry" in fp16(50).detail
    float32 = nf4_explorer.explain_linear(torch.randn(50, 128, dtype=torch.float32, device=device), packed, state)
    assert (float32.variant, float32.reason) == ("linear_dequantize", "default")
    # A float16 entry at the same M bucket and shape wins over the bfloat16 one; another M bucket does not.
    rewrite([*entries, _tuned_entry([32, 128], 64, "linear_gemv", out_dtype="float16")])
    assert (fp16(50).variant, fp16(50).reason) == ("linear_gemv", "tuned (exact)")
    assert (fp16(1).variant, fp16(1).reason) == ("linear_gemv", "tuned (other 16-bit dtype)")
    assert (choose(50).variant, choose(50).reason) == ("linear_tiled", "tuned (exact)")


def test_an_entry_whose_variant_declines_gives_way_to_the_next(monkeypatch, tmp_path, device):
    """A float16 x on a bfloat16 weight, which linear_lut_gemm declines (it decodes on x's grid): its
    tuned entry at the exact shape gives way to the nearest entry whose variant takes the problem,
    not to dequantize + cuBLAS; a problem its variant takes still gets it."""
    _fake_gpu_file(monkeypatch, tmp_path, [_tuned_entry([32, 128], 4, "linear_lut_gemm", out_dtype="float16"),
                                           _tuned_entry([64, 128], 4, "linear_tiled", out_dtype="float16")])
    _, packed, state, _ = _problem(32, 128, 1, torch.bfloat16, device)
    x = torch.randn(3, 128, dtype=torch.float16, device=device)
    choice = nf4_explorer.explain_linear(x, packed, state)
    assert (choice.variant, choice.reason) == ("linear_tiled", "tuned (nearest shape)"), choice
    assert "the nearer linear_lut_gemm entry (shape [32, 128], M bucket 4) cannot take this problem" in choice.detail
    _check("linear_tiled", choice.config, x, packed, state, None)
    _, packed16, state16, _ = _problem(32, 128, 1, torch.float16, device)
    assert nf4_explorer.explain_linear(x, packed16, state16).variant == "linear_lut_gemm"


@pytest.mark.parametrize("boundary, taken, declined", [(16, 0, 1), (4, 2, 1)], ids=["cp.async", "pairs"])
def test_each_alignment_of_x_is_its_own_problem(boundary, taken, declined, monkeypatch, tmp_path, device):
    """A variant that declines an x off a ``boundary``-byte boundary (16: the cp.async kernels; 4:
    linear_mma_gemv's 32-bit pairs) keeps its entry for an x it takes, before and after one it
    declines: the dispatcher remembers its choice per alignment (x's address mod 16), so the x it
    declines is not handed the other's variant (a misaligned load). Offsets in elements."""
    import dataclasses

    from nf4_explorer import _registry

    tiled = _registry.get("linear_tiled")
    picky = dataclasses.replace(tiled, accepts=lambda args: "misaligned x" if args.x2d.data_ptr() % boundary else None)
    monkeypatch.setitem(_registry._REGISTRY, "linear_tiled", picky)
    _fake_gpu_file(monkeypatch, tmp_path, [_tuned_entry([32, 128], 4, "linear_tiled")])
    _, packed, state, _ = _problem(32, 128, 1, torch.bfloat16, device)
    storage = torch.randn(4 * 128 + 8, dtype=torch.bfloat16, device=device)
    good, bad = (storage[offset:offset + 4 * 128].view(4, 128) for offset in (taken, declined))
    assert nf4_explorer.explain_linear(good, packed, state).variant == "linear_tiled"
    choice = nf4_explorer.explain_linear(bad, packed, state)
    assert choice.variant != "linear_tiled" and "cannot take this problem" in choice.detail, choice
    assert nf4_explorer.explain_linear(good, packed, state).variant == "linear_tiled"
    reference = tuning.reference_linear(bad, packed, state)
    error = (nf4_explorer.linear(bad, packed, state).double() - reference).abs().max().item()
    assert error <= tuning.tolerance(bad, packed, state, reference=reference)


def _within_contract_or_declined(x, packed, state, bias, names) -> list:
    """Calls ``linear`` with each of ``names`` (None: the dispatcher): each result is within the
    contract, or the variant declines with a ValueError that names it. Returns the names that ran."""
    reference = tuning.reference_linear(x, packed, state, bias)
    bound = tuning.tolerance(x, packed, state, bias, reference=reference)
    ran = []
    for name in names:
        try:
            y = nf4_explorer.linear(x, packed, state, bias, variant=name)
        except ValueError as exc:
            assert name is not None and name in str(exc), exc  # a decline names the variant and why
            continue
        error = (y.double() - reference).abs().max().item()
        assert error <= bound, f"{name or 'the dispatcher'}: error {error} over the bound {bound}"
        ran.append(name)
    return ran


@pytest.mark.parametrize("offset", [1, 2, 4])
def test_every_variant_computes_an_unaligned_x_or_declines_it(offset, device):
    """x and the absmax as views starting off a 16-byte boundary (x at 2, 4 or 8 bytes in): each
    variant declines such an x with a reason or computes it within the contract (a misaligned
    vector load would be a sticky CUDA error, the process's GPU lost), and so does the dispatcher."""
    m, n, k = 4, 64, 256
    _, packed, state, _ = _problem(n, k, m, torch.bfloat16, device)
    storage = torch.randn(m * k + offset, dtype=torch.bfloat16, device=device)
    x = storage[offset:].view(m, k)
    codes = torch.empty(state.absmax.numel() + 3, dtype=torch.uint8, device=device)
    codes[3:] = state.absmax
    state.absmax = codes[3:]
    ran = _within_contract_or_declined(x, packed, state, None, [None, *nf4_explorer.names(device, family="linear")])
    assert None in ran and len(ran) > 2, ran


@pytest.mark.parametrize("offset", [1, 2, 4])
def test_every_variant_computes_an_unaligned_bias_or_declines_it(offset, device):
    """The bias as a view starting off a 16-byte boundary (2, 4 or 8 bytes in: a slice of a fused
    q/k/v bias, say): each variant computes it within the contract or declines it with a reason, and
    so does the dispatcher, first and again (its kept plan refuses unaligned pointers)."""
    m, n, k = 4, 64, 256
    x, packed, state, _ = _problem(n, k, m, torch.bfloat16, device)
    storage = torch.randn(n + offset, dtype=torch.bfloat16, device=device)
    bias = storage[offset:]
    ran = _within_contract_or_declined(x, packed, state, bias,
                                       [None, None, *nf4_explorer.names(device, family="linear")])
    assert ran[:2] == [None, None] and len(ran) > 3, ran


def test_nearest_shape_is_nearest_in_n_and_k(monkeypatch, tmp_path, device):
    """Untuned shapes take the tuned shape nearest in N and in K, not just in size: an up projection
    (N > K) the up projection's entry, a down projection the down projection's."""
    _fake_gpu_file(monkeypatch, tmp_path, [_tuned_entry([64, 256], 64, "linear_tiled"),
                                           _tuned_entry([256, 64], 64, "linear_gemv")])
    for (n, k), variant in (((192, 64), "linear_gemv"), ((64, 192), "linear_tiled")):
        _, packed, state, _ = _problem(n, k, 1, torch.bfloat16, device)
        choice = nf4_explorer.explain_linear(torch.randn(64, k, dtype=torch.bfloat16, device=device), packed, state)
        assert (choice.variant, choice.reason) == (variant, "tuned (nearest shape)"), (n, k)


@pytest.mark.gpu
def test_cuda_graph_replay():
    """Decoding runs under CUDA graphs: a captured call replays on new x in place."""
    x, packed, state, bias = _problem(256, 512, 1, torch.bfloat16, "cuda", bias=True)
    for name in LINEAR:
        if nf4_explorer.get(name).accepts(tuning.prepare_linear(x, packed, state, bias)) is not None:
            continue
        static_x = x.clone()
        nf4_explorer.linear(static_x, packed, state, bias, variant=name)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = nf4_explorer.linear(static_x, packed, state, bias, variant=name)
        new_x = torch.randn_like(x)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert_bit_equal(static_out, nf4_explorer.linear(new_x, packed, state, bias, variant=name), name)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_llm_shape_within_contract_on_gpu(m):
    bnb = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(1024, 4096, dtype=torch.bfloat16, device="cuda")
    packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
    for name in LINEAR:
        _check(name, nf4_explorer.get(name).default_config(64), x, packed, state, None)


@pytest.mark.gpu
def test_backward_equals_bitsandbytes_on_gpu():
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(512, 1024, dtype=torch.bfloat16, device="cuda")
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    x = torch.randn(3, 9, 1024, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    grad = torch.randn(3, 9, 512, dtype=torch.bfloat16, device="cuda")
    (ours,) = torch.autograd.grad(nf4_explorer.linear(x, packed, state), x, grad)
    (theirs,) = torch.autograd.grad(bnb.matmul_4bit(x, packed.t(), quant_state=state), x, grad)
    assert_bit_equal(ours, theirs, "input gradient")


def test_a_variant_that_declines_is_skipped_by_the_dispatcher(monkeypatch, device):
    """linear_bitsandbytes declines CPU tensors (and any problem bitsandbytes' kernel cannot take):
    forced, it says why; tuned, the dispatcher falls back to dequantize + cuBLAS and says why."""
    if device.type != "cpu":
        pytest.skip("about CPU tensors (the interpreter): on a GPU machine they are refused before any variant")
    x, packed, state, _ = _problem(16, 64, 2, torch.float16, "cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        nf4_explorer.linear(x, packed, state, variant="linear_bitsandbytes")
    monkeypatch.setenv("NF4_EXPLORER_LINEAR_VARIANT", "linear_bitsandbytes")
    _dispatch.reset()
    choice = nf4_explorer.explain_linear(x, packed, state)
    assert choice.variant == "linear_dequantize" and "linear_bitsandbytes cannot take this problem" in choice.detail
    expected = torch.nn.functional.linear(x, nf4_explorer.dequantize(packed, state).to(x.dtype))
    assert_bit_equal(nf4_explorer.linear(x, packed, state), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_register_lut_decode_equals_its_table(quant_type, dtype):
    """The PTX register LUT (prmt) gives exactly the values of its table section, for every code
    in every position of a word, both as float32 codes and as absmax-scaled 16-bit weights."""
    import triton
    import triton.language as tl

    from nf4_explorer import _decode, _format

    @triton.jit
    def decode(words_ptr, absmax_ptr, table_ptr, values_ptr, weights_ptr, n, DTYPE: tl.constexpr, PTX: tl.constexpr):
        i = tl.arange(0, 1024)
        words = tl.load(words_ptr + i, mask=i < n, other=0)
        absmax = tl.load(absmax_ptr + i, mask=i < n, other=0.0)
        values = _decode.lut_values(words, table_ptr, DTYPE, PTX)
        weights = _decode.lut_weights(words, absmax, table_ptr, DTYPE, PTX)
        for j in tl.static_range(8):
            tl.store(values_ptr + i * 8 + j, values[j], mask=i < n)
            tl.store(weights_ptr + i * 8 + j, weights[j], mask=i < n)

    words = torch.randint(-2**31, 2**31 - 1, (1000,), dtype=torch.int32, device="cuda")
    words[:16] = torch.arange(16, dtype=torch.int32, device="cuda") * 0x11111111  # every code everywhere
    absmax = torch.rand(1000, device="cuda") * 4
    table = _format.device_pair_table(quant_type, torch.device("cuda"))
    tl_dtype = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    results = []
    for ptx in (True, False):
        values = torch.full((1000 * 8,), float("nan"), device="cuda")
        weights = torch.full((1000 * 8,), float("nan"), dtype=dtype, device="cuda")
        decode[(1,)](words, absmax, table, values, weights, 1000, tl_dtype, ptx)
        results.append((values, weights))
    assert_bit_equal(results[0][0], results[1][0], "lut_values")
    assert_bit_equal(results[0][1], results[1][1], "lut_weights")
