"""`nf4-explorer bench --e2e`: whole models, patched vs unpatched, in one process.

Models come from ``transformers.LlamaConfig`` with random weights (no download). Every decoder
Linear is replaced by a bitsandbytes ``Linear4bit`` (NF4, double quant, bf16 compute) quantized on
the GPU, as ``load_in_4bit`` does. Measured for the dense bf16 model, the NF4 model under
bitsandbytes, and the NF4 model with ``patch_bitsandbytes(linear=True)``:

- greedy decoding, eager and with transformers' static cache (which compiles the forward with
  ``torch.compile(mode="reduce-overhead")``: CUDA graphs), on a ``layers``-layer model;
- a prefill forward of ``prefill`` tokens on the same model;
- a QLoRA step (PEFT LoRA r=16 on every linear layer, forward + backward + AdamW) on a
  ``train_layers``-layer model.

Checks, patched against unpatched (``E2ECheck``): graph breaks of the compiled decode; teacher-forced
logits, each provider's error against a float32 model of the same dequantized weights (the linear
family's contract, model-wide: patched error <= 2x bitsandbytes' + one bf16 ulp); the loss after 20
QLoRA steps from the same start (within 1%).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

import nf4_explorer

PROVIDERS = ("dense", "bitsandbytes", "patched")


@dataclasses.dataclass
class E2ERow:
    measure: str
    dense: float
    bitsandbytes: float
    patched: float
    unit: str


@dataclasses.dataclass
class E2ECheck:
    check: str
    bitsandbytes: float
    patched: float
    bound: str
    passed: bool


def llama_config(layers: int):
    """Llama-3-8B's shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads) with ``layers``
    decoder layers."""
    import transformers

    return transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    max_position_embeddings=4096)


def quantize_linears(model, dtype=torch.bfloat16):
    """Replaces every Linear of the decoder layers by an NF4 double-quant Linear4bit, quantized on
    the GPU by bitsandbytes (as load_in_4bit does)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4", compress_statistics=True,
                                          device="meta")
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                    if child.bias is not None:
                        q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(parent, name, q.cuda())  # quantizes (Params4bit.to)
    return model


def build_models(layers: int, with_reference: bool = False):
    """(config, dense bf16 model, its NF4 copy[, a float32 model of the NF4 copy's dequantized weights])."""
    import bitsandbytes.functional as F
    import transformers

    config = llama_config(layers)
    with torch.device("cuda"):
        dense = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
        quantized = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    quantized.load_state_dict(dense.state_dict())
    quantized = quantize_linears(quantized).eval()
    if not with_reference:
        return config, dense, quantized
    with torch.device("cuda"):
        reference = transformers.LlamaForCausalLM(config).float().eval()
    reference.load_state_dict(dense.state_dict())
    for ref_layer, q_layer in zip(reference.model.layers, quantized.model.layers):
        for part in ("self_attn", "mlp"):
            for name, child in getattr(q_layer, part).named_children():
                if hasattr(child, "weight") and hasattr(child.weight, "quant_state"):
                    weight = F.dequantize_4bit(child.weight, child.weight.quant_state)
                    getattr(getattr(ref_layer, part), name).weight.data.copy_(weight.float())
    return config, dense, quantized, reference


def _seconds(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def _under(provider: str):
    """The context a provider runs in: the patch for "patched", nothing otherwise."""
    import contextlib

    return nf4_explorer.patch_bitsandbytes(linear=True) if provider == "patched" else contextlib.nullcontext()


def e2e_bench(layers: int = 32, batches=(1, 8), prompt: int = 32, new_tokens: int = 128, prefill: int = 2048,
              train_layers: int = 8, train_batch: int = 4, train_tokens: int = 1024, repeats: int = 3,
              compiled: bool = True, log: Callable[[str], None] = lambda line: None):
    """Runs every measure and check; returns (rows, checks). ``log`` gets a line per step done."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    rows, checks = [], []
    config, dense, quantized = build_models(layers)
    models = {"dense": dense, "bitsandbytes": quantized, "patched": quantized}
    log(f"built {layers}-layer models")
    rows.append(_host_row(dense, quantized))
    log(str(rows[-1]))

    def three(measure, run, unit, invert, compiles=False):
        """Times ``run`` per provider; returns the graph breaks each compile counted."""
        values, breaks = {}, {}
        for provider in PROVIDERS:
            if compiles:
                torch._dynamo.reset()  # compiled graphs and CUDA graphs hold the kernels of their capture
                counters.clear()
            with _under(provider):
                values[provider] = invert(_seconds(lambda: run(models[provider]), repeats))
            breaks[provider] = sum(counters["graph_break"].values())
            log(f"{measure}: {provider} {values[provider]:.1f} {unit}" + (f", {breaks[provider]} graph breaks"
                                                                          if compiles else ""))
        rows.append(E2ERow(measure, values["dense"], values["bitsandbytes"], values["patched"], unit))
        return breaks

    for static in ((False, True) if compiled else (False,)):
        for batch in batches:
            ids = torch.randint(0, config.vocab_size, (batch, prompt), device="cuda")
            options = {"cache_implementation": "static"} if static else {}

            def decode(model, ids=ids, options=options):
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0, **options)

            kind = "static cache, compiled" if static else "eager"
            breaks = three(f"decode batch {batch} {kind} ({prompt}+{new_tokens} tokens)", decode, "tok/s",
                           lambda s, b=batch: b * new_tokens / s, compiles=static)
            if static:
                checks.append(E2ECheck(f"graph breaks, compiled decode batch {batch}", breaks["bitsandbytes"],
                                       breaks["patched"], "0", breaks["patched"] == 0))
    torch._dynamo.reset()
    long_ids = torch.randint(0, config.vocab_size, (1, prefill), device="cuda")

    def prefill_forward(model):
        with torch.no_grad():
            model(long_ids, use_cache=False)

    three(f"prefill 1x{prefill}", prefill_forward, "ms", lambda s: s * 1e3)
    del dense, quantized, models
    torch.cuda.empty_cache()

    config, dense, quantized, reference = build_models(train_layers, with_reference=True)
    log(f"built {train_layers}-layer models with a float32 reference")
    checks.append(_logits_check(quantized, reference, config))
    del reference
    torch.cuda.empty_cache()
    row, check = _train(dense, quantized, config, train_batch, train_tokens, repeats, log)
    rows.append(row)
    checks.append(check)
    return rows, checks


def _host_row(dense, quantized, calls: int = 2000) -> E2ERow:
    """Host time of one q_proj forward at M = 1 (4096x4096), back to back without a sync: the host
    path every eager decoding step pays per linear layer (the GPU's kernel is shorter)."""
    x = torch.randn(1, 1, dense.config.hidden_size, dtype=torch.bfloat16, device="cuda")
    values = {}
    for provider, model in (("dense", dense), ("bitsandbytes", quantized), ("patched", quantized)):
        layer = model.model.layers[0].self_attn.q_proj
        with _under(provider), torch.no_grad():
            for _ in range(50):
                layer(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                layer(x)
            values[provider] = (time.perf_counter() - start) / calls * 1e6
            torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        torch.empty((1, 1, 4096), dtype=torch.bfloat16, device="cuda")
    empty = (time.perf_counter() - start) / calls * 1e6
    return E2ERow(f"host time of a q_proj forward, M = 1 (4096x4096; torch.empty: {empty:.1f} us)", values["dense"],
                  values["bitsandbytes"], values["patched"], "us/call")


def _logits_check(quantized, reference, config, tokens: int = 128) -> E2ECheck:
    """Teacher-forced logits over ``tokens`` tokens: each provider's max error against the float32
    model of the same dequantized weights; patched may err at most twice bitsandbytes' plus one
    bf16 ulp at the largest logit (the linear family's contract, applied to the whole model)."""
    import math

    ids = torch.randint(0, config.vocab_size, (1, tokens), device="cuda")
    with torch.no_grad():
        truth = reference(ids, use_cache=False).logits.double()
        errors = {}
        for provider in ("bitsandbytes", "patched"):
            with _under(provider):
                errors[provider] = (quantized(ids, use_cache=False).logits.double() - truth).abs().max().item()
    top = truth.abs().max().item()
    ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** (math.frexp(top)[1] - 1)
    bound = 2 * errors["bitsandbytes"] + ulp
    return E2ECheck(f"logits max error vs float32 ({tokens} tokens, teacher-forced)", errors["bitsandbytes"],
                    errors["patched"], f"<= {bound:.4f}", errors["patched"] <= bound)


def _train(dense, quantized, config, batch: int, tokens: int, repeats: int, log, steps: int = 20):
    """One QLoRA step (LoRA r=16 on every linear layer, frozen base), timed per provider; then the loss
    after ``steps`` steps from the same LoRA start, bitsandbytes vs patched."""
    import peft

    ids = torch.randint(0, config.vocab_size, (batch, tokens), device="cuda")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    times, losses = {}, {}
    for provider, base in (("dense", dense), ("bitsandbytes", quantized), ("patched", quantized)):
        torch.manual_seed(1)  # the same LoRA start for every provider
        model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        loss = None

        def step():
            nonlocal loss
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with _under(provider):
            times[provider] = _seconds(step, repeats) * 1e3
            if provider != "dense":
                for _ in range(steps - repeats - 1):
                    step()
                losses[provider] = loss.item()
        log(f"QLoRA step: {provider} {times[provider]:.1f} ms" + (f", loss {losses[provider]:.4f}"
                                                                   if provider in losses else ""))
        model.unload()  # the base model without LoRA layers, for the next provider
        del optimizer
    row = E2ERow(f"QLoRA step {batch}x{tokens} (fwd+bwd+AdamW)", times["dense"], times["bitsandbytes"],
                 times["patched"], "ms")
    gap = abs(losses["patched"] - losses["bitsandbytes"]) / abs(losses["bitsandbytes"])
    check = E2ECheck(f"QLoRA loss after {steps} steps (same start)", losses["bitsandbytes"], losses["patched"],
                     "within 1%", gap <= 0.01)
    return row, check
