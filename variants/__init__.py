"""nf4_explorer: bitsandbytes-format 4-bit weights through tuned Triton kernel variants.

Public API:
    dequantize(packed, state, *, out=None, variant=None, config=None) -> Tensor
    linear(x, packed, state, bias=None, *, variant=None, config=None) -> Tensor   # x @ W.T + bias
    quantize(weight, *, blocksize=64, double_quant=True, quant_type="nf4") -> (packed, state)
    reference_dequantize(packed, state) -> Tensor       # pure PyTorch ground truth
    reference_linear(x, packed, state, bias=None) -> Tensor   # float64 ground truth
    explain(packed, state), explain_linear(x, packed, state) -> Choice   # what would run, and why
    patch_bitsandbytes()                                 # route bitsandbytes through nf4-explorer
    registry: names(device=None, family="dequantize"), get(name), register(Variant)
    tools (the tuner, benchmarks): nf4_explorer.tuning

Importing this package does no GPU work and reads no file: the tuned-config file of a GPU is
read at the first dequantization on that GPU.
"""

import importlib
import pkgutil

from ._format import QuantState
from ._reference import quantize, reference_dequantize
from ._registry import Variant, VariantUnavailable, get, names, register
from ._dispatch import Choice, explain, explain_linear
from ._api import dequantize, linear
from ._linear import reference_linear
from ._patch import patch_bitsandbytes

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

__version__ = "0.2.0"

__all__ = [
    "Choice", "QuantState", "Variant", "VariantUnavailable", "__version__", "dequantize", "explain", "explain_linear",
    "get", "linear", "names", "patch_bitsandbytes", "quantize", "reference_dequantize", "reference_linear", "register",
]
