"""`nf4-explorer bench --e2e`: whole models, patched vs unpatched, in one process.

Models come from ``transformers.LlamaConfig`` with random weights (no download). Every decoder
Linear is replaced by a bitsandbytes ``Linear4bit`` (NF4, double quant, bf16 compute) quantized on
the GPU, as ``load_in_4bit`` does. Measured: greedy decoding (eager), a prefill forward, and a QLoRA
training step (PEFT LoRA on every linear layer, forward + backward + AdamW), each for the dense
bf16 model, the NF4 model under bitsandbytes, and the NF4 model with ``patch_bitsandbytes(linear=True)``.
"""

from __future__ import annotations

import dataclasses
import time

import torch

import nf4_explorer


@dataclasses.dataclass
class E2ERow:
    measure: str
    dense: float
    bitsandbytes: float
    patched: float
    unit: str


def llama_config(layers: int):
    """Llama-3-8B's shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads) with ``layers``
    decoder layers."""
    import transformers

    return transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    max_position_embeddings=4096)


def quantize_linears(model, dtype=torch.bfloat16):
    """Replaces every Linear of the decoder layers by an NF4 double-quant Linear4bit (bitsandbytes
    quantizes on .cuda(), as load_in_4bit does)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                    setattr(parent, name, q.cuda())
    return model


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


def e2e_bench(layers: int = 8, batches=(1, 8), prompt: int = 32, new_tokens: int = 64, prefill: int = 2048,
              train_batch: int = 4, train_tokens: int = 1024, repeats: int = 3) -> list[E2ERow]:
    import transformers

    torch.manual_seed(0)
    config = llama_config(layers)
    with torch.device("cuda"):
        dense = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
        quantized = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    quantized.load_state_dict(dense.state_dict())
    quantized = quantize_linears(quantized).eval()
    rows = []

    def three(measure, run, unit, invert):
        values = {}
        for name, model in (("dense", dense), ("bitsandbytes", quantized), ("patched", quantized)):
            if name == "patched":
                with nf4_explorer.patch_bitsandbytes(linear=True):
                    seconds = _seconds(lambda: run(model), repeats)
            else:
                seconds = _seconds(lambda: run(model), repeats)
            values[name] = invert(seconds)
        rows.append(E2ERow(measure, values["dense"], values["bitsandbytes"], values["patched"], unit))

    for batch in batches:
        ids = torch.randint(0, config.vocab_size, (batch, prompt), device="cuda")

        def decode(model, ids=ids):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)

        three(f"decode batch {batch} eager ({prompt}+{new_tokens} tokens)", decode, "tok/s",
              lambda s, b=batch: b * new_tokens / s)
    long_ids = torch.randint(0, config.vocab_size, (1, prefill), device="cuda")

    def prefill_forward(model):
        with torch.no_grad():
            model(long_ids, use_cache=False)

    three(f"prefill 1x{prefill}", prefill_forward, "ms", lambda s: s * 1e3)
    rows.append(_train_rows(dense, quantized, config, train_batch, train_tokens, repeats))
    return rows


def _train_rows(dense, quantized, config, batch: int, tokens: int, repeats: int) -> E2ERow:
    """One QLoRA step (LoRA r=16 on every linear layer, frozen base): forward + backward + AdamW."""
    import peft

    ids = torch.randint(0, config.vocab_size, (batch, tokens), device="cuda")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    values = {}
    for name, base in (("dense", dense), ("bitsandbytes", quantized), ("patched", quantized)):
        model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if name == "patched":
            with nf4_explorer.patch_bitsandbytes(linear=True):
                values[name] = _seconds(step, repeats) * 1e3
        else:
            values[name] = _seconds(step, repeats) * 1e3
        model.unload()  # the base model without LoRA layers, for the next provider
        del optimizer
    return E2ERow(f"QLoRA step {batch}x{tokens} (fwd+bwd+AdamW)", values["dense"], values["bitsandbytes"],
                  values["patched"], "ms")
