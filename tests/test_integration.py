"""torch.compile (custom op, no graph break) and the bitsandbytes drop-in."""

import pytest
import torch

import nf4_explorer
from nf4_explorer._registry import Variant
from helpers import assert_bit_equal

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches through nf4-explorer's variants."""
    calls = []
    original = Variant.launch

    def counting(self, args, config):
        calls.append(self.name)
        return original(self, args, config)

    monkeypatch.setattr(Variant, "launch", counting)
    return calls


@pytest.mark.parametrize("double_quant", [True, False])
def test_torch_compile_fullgraph_same_bits(device, double_quant, launches):
    weight = torch.randn(32, 64, dtype=torch.bfloat16, device=device)
    packed, state = nf4_explorer.quantize(weight, double_quant=double_quant)
    x = torch.randn(5, 64, dtype=torch.bfloat16, device=device)

    def layer(x, packed, state):
        return torch.nn.functional.linear(x, nf4_explorer.dequantize(packed, state))

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    assert_bit_equal(compiled(x, packed, state), layer(x, packed, state))
    assert launches  # the compiled graph ran our kernels, not a fallback


def test_custom_op_fake_gives_shape_and_dtype():
    packed, state = nf4_explorer.quantize(torch.randn(8, 64, dtype=torch.float16), double_quant=True)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = nf4_explorer._op.call_op(mode.from_tensor(packed), _fake_state(mode, state))
    assert fake.shape == (8, 64) and fake.dtype == torch.float16


def _fake_state(mode, state):
    s2 = state.state2
    fake2 = nf4_explorer.QuantState(absmax=mode.from_tensor(s2.absmax), shape=s2.shape, dtype=s2.dtype,
                                blocksize=s2.blocksize, code=mode.from_tensor(s2.code))
    return nf4_explorer.QuantState(absmax=mode.from_tensor(state.absmax), shape=state.shape, dtype=state.dtype,
                               blocksize=state.blocksize, quant_type=state.quant_type,
                               offset=mode.from_tensor(state.offset), state2=fake2)


def test_patch_is_a_context_manager_and_restores(device, launches):
    weight = torch.randn(16, 64, dtype=torch.float16, device=device)
    packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    original = F.dequantize_4bit
    with nf4_explorer.patch_bitsandbytes():
        assert F.dequantize_4bit is not original
        patched = F.dequantize_4bit(packed, state)
        with pytest.raises(RuntimeError, match="already patched"):
            nf4_explorer.patch_bitsandbytes()
    assert F.dequantize_4bit is original
    assert launches
    assert_bit_equal(patched, original(packed, state))
    handle = nf4_explorer.patch_bitsandbytes()
    handle.restore()
    handle.restore()
    assert F.dequantize_4bit is original


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear4bit_patched_equals_unpatched(device, quant_type, compress_statistics, dtype, launches):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=dtype, quant_type=quant_type,
                              compress_statistics=compress_statistics).to(dtype).to(device)
    # Several tokens with gradients (QLoRA training). bitsandbytes 0.50's forward runs a fused 4-bit
    # GEMM (no dequantize_4bit); the input gradient dequantizes the weight then matmuls.
    x = torch.randn(2, 7, 64, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(2, 7, 48, dtype=dtype, device=device)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    with nf4_explorer.patch_bitsandbytes():
        patched = layer(x)
        (patched_grad,) = torch.autograd.grad(patched, x, grad)
    assert len(launches) == 1, "the backward did not dequantize through nf4-explorer"
    assert_bit_equal(patched, expected)
    assert_bit_equal(patched_grad, expected_grad)


def _tiny_llama_4bit(quant_type="nf4", compress_statistics=True):
    """A small Llama built by transformers from a config (random weights, no download), its
    decoder Linear layers replaced by bitsandbytes Linear4bit and quantized on the GPU."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type=quant_type,
                                          compress_statistics=compress_statistics)
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=quant_type,
                                                 compress_statistics=compress_statistics)
                    setattr(parent, name, q)
    return model.cuda()


@pytest.mark.gpu
def test_small_llama_logits_and_gradients_patched_equal_unpatched(launches):
    model = _tiny_llama_4bit()
    ids = torch.randint(0, 1000, (2, 16), device="cuda")
    embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)

    def run():
        logits = model(inputs_embeds=embeds).logits
        (grad,) = torch.autograd.grad(logits.float().square().mean(), embeds)
        return logits.detach(), grad

    expected_logits, expected_grad = run()
    with nf4_explorer.patch_bitsandbytes():
        logits, grad = run()
    assert launches, "the backward did not dequantize through nf4-explorer"
    assert_bit_equal(logits, expected_logits, "logits")
    assert_bit_equal(grad, expected_grad, "input gradient")
