"""nf4-explorer's runtime: bitsandbytes-format 4-bit dequantization through Triton kernel variants.

Public API:
    dequantize(packed, state, *, out=None, variant=None, config=None) -> Tensor
    quantize(weight, *, blocksize=64, double_quant=True, quant_type="nf4") -> (packed, state)
    reference_dequantize(packed, state) -> Tensor       # pure PyTorch ground truth
    explain(packed, state) -> Choice                     # which variant/config would run, and why
    registry: names(device=None), get(name), register(Variant)

Importing this package does no GPU work and reads no file: the tuned-config file of a GPU is
read at the first dequantization on that GPU.
"""

import importlib
import pkgutil

from ._format import QuantState
from ._reference import quantize, reference_dequantize
from ._registry import Variant, VariantUnavailable, get, names, register
from ._dispatch import Choice, dequantize, explain
from ._op import patch_bitsandbytes

# Every public module of this package but the tools' door (``tuning``) is a variant that registers
# itself: adding a variant is adding one file. Subpackages (the tuner, the shipped tuned files) are
# not variants. A variant that the installed Triton cannot express (VariantUnavailable) is left
# out; a tuned entry naming it is then skipped with a warning like any stale entry.
NOT_VARIANTS = frozenset({"tuning"})
for _module in pkgutil.iter_modules(__path__):
    if not _module.ispkg and not _module.name.startswith("_") and _module.name not in NOT_VARIANTS:
        try:
            importlib.import_module(f"{__name__}.{_module.name}")
        except VariantUnavailable:
            pass

__all__ = [
    "Choice", "QuantState", "Variant", "VariantUnavailable", "dequantize", "explain", "get", "names",
    "patch_bitsandbytes", "quantize", "reference_dequantize", "register",
]
