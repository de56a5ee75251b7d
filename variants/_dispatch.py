"""The dispatcher behind ``nf4_explorer.dequantize``: which variant and config run for a problem.

Choice order: ``variant=``/``config=`` arguments, then ``$NF4_EXPLORER_VARIANT``, then the GPU's
tuned file (exact problem key, else the nearest size bucket with the same quant type, blocksize,
double quant and dtype), else the built-in default. The choice is memoized per problem, so a
steady-state call costs one dict lookup before the launch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch

from . import _cache, _registry
from ._format import prepare

ENV_VARIANT = "NF4_EXPLORER_VARIANT"

# Built-in default, from what wins on an H100 (docs/performance.md): word_unpack, 32-bit word loads
# unpacked straight into 16-byte stores.
DEFAULT_VARIANT = "word_unpack"


@dataclasses.dataclass(frozen=True)
class Choice:
    """What ``dequantize`` runs for a problem, and why.

    reason is one of "argument", "environment", "tuned (exact)", "tuned (nearest bucket)",
    "default"; ``source`` names the tuned file or the override, ``detail`` the matched entry.
    """

    variant: str
    config: Mapping[str, Any]
    reason: str
    source: str = ""
    detail: str = ""

    def __str__(self) -> str:
        where = f" from {self.source}" if self.source else ""
        more = f" ({self.detail})" if self.detail else ""
        return f"{self.variant} {dict(self.config)} [{self.reason}{where}{more}]"


_memo: dict[tuple, tuple] = {}  # problem key -> (Choice, Variant)
_entries_by_device: dict[str, tuple[str, list[dict]]] = {}


def reset() -> None:
    """Forgets memoized choices and loaded files (after a re-tune, or in tests)."""
    _memo.clear()
    _entries_by_device.clear()


def _device_entries(device: torch.device) -> tuple[str, list[dict]]:
    name = _cache.device_name(device)
    if name not in _entries_by_device:
        path, entries = _cache.load_entries(name)
        _entries_by_device[name] = (str(path) if path else "", entries)
    return _entries_by_device[name]


def _choose(args, device: torch.device) -> Choice:
    forced = os.environ.get(ENV_VARIANT)
    if forced:
        variant = _registry.get(forced)
        return Choice(variant.name, variant.default_config(args.blocksize), "environment", f"${ENV_VARIANT}")
    source, entries = _device_entries(device)
    dtype = _cache.DTYPE_NAMES[args.out_dtype]
    shape = [args.n_rows, args.n_cols] if args.n_rows > 1 else [args.n_cols]
    same_kind = [
        e for e in entries
        if e["quant_type"] == args.quant_type and e["blocksize"] == args.blocksize
        and e["double_quant"] == args.double_quant and e["out_dtype"] == dtype
    ]
    for entry in same_kind:
        if list(entry["shape"]) == shape:
            return Choice(entry["variant"], dict(entry["config"]), "tuned (exact)", source, f"shape {shape}")
    if same_kind:
        bucket = _cache.size_bucket(args.n)
        entry = min(same_kind, key=lambda e: (abs(e["size_bucket"] - bucket), -e["size_bucket"]))
        return Choice(
            entry["variant"], dict(entry["config"]), "tuned (nearest bucket)", source,
            f"tuned shape {entry['shape']}, bucket {entry['size_bucket']} for {bucket}",
        )
    variant = _registry.get(DEFAULT_VARIANT)
    return Choice(variant.name, variant.default_config(args.blocksize), "default")


def _problem_key(args, device) -> tuple:
    return (device, args.quant_type, args.blocksize, args.double_quant, args.out_dtype, args.n_rows, args.n_cols)


def _resolve(args, variant: str | None, config: Mapping | None) -> tuple[Choice, "_registry.Variant"]:
    if variant is not None or config is not None:
        if variant is None:
            raise ValueError("config= needs variant=: a config belongs to one variant")
        chosen = _registry.get(variant)
        config = dict(config) if config is not None else chosen.default_config(args.blocksize)
        chosen.check_config(config, args.blocksize)
        return Choice(chosen.name, config, "argument"), chosen
    key = _problem_key(args, args.device)
    resolved = _memo.get(key)
    if resolved is None:
        choice = _choose(args, args.device)
        resolved = _memo[key] = (choice, _registry.get(choice.variant))
    return resolved


def dequantize(
    packed: torch.Tensor,
    state: Any,
    *,
    out: torch.Tensor | None = None,
    variant: str | None = None,
    config: Mapping | None = None,
) -> torch.Tensor:
    """Dequantizes a bitsandbytes 4-bit weight; bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    Args:
        packed: uint8 packed codes, shape [ceil(n/2), 1] (bitsandbytes) or any shape with that many
            bytes (e.g. [rows, cols/2]); element 2i in the high nibble of byte i. Non-contiguous
            input is copied.
        state: a :class:`nf4_explorer.QuantState` or a bitsandbytes ``QuantState`` (duck-typed).
        out: optional contiguous output of ``state.shape`` and ``state.dtype`` on packed's device.
        variant, config: force a registered variant (and one config of its space); None lets the
            dispatcher choose from the GPU's tuned file or the built-in default.

    Returns:
        Tensor of ``state.shape`` and ``state.dtype`` (float16, bfloat16 or float32).

    Raises:
        TypeError / ValueError naming the problem and the fix (wrong dtype, sizes, devices, unknown
        variant or config, CPU tensors without TRITON_INTERPRET=1).
    """
    if torch.compiler.is_compiling():
        # Under torch.compile the whole call is one opaque custom op (see _op.py).
        if out is not None or variant is not None or config is not None:
            raise ValueError("under torch.compile, dequantize takes no out=/variant=/config=: set "
                             "$NF4_EXPLORER_VARIANT or tune instead")
        from ._op import call_op

        return call_op(packed, state)
    args = prepare(packed, state, out)
    choice, chosen = _resolve(args, variant, config)
    chosen.launch(args, choice.config)
    return args.out


def explain(packed: torch.Tensor, state: Any, *, variant: str | None = None, config: Mapping | None = None) -> Choice:
    """The :class:`Choice` that ``dequantize(packed, state, variant=..., config=...)`` would run."""
    args = prepare(packed, state, None, allocate=False)
    return _resolve(args, variant, config)[0]
