"""The registry of kernel variants, in two families.

``dequantize`` variants write the dequantized weight; ``linear`` variants compute
``x @ dequantize(W).T (+ bias)``. Within a family every kernel takes the same runtime arguments,
built by the family's argument object (``DequantArgs.kernel_arguments()``,
``LinearArgs.kernel_arguments()``), so one launcher (``_launch.py``) serves them all::

    dequantize: kernel[grid](packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr,
                             n, n_rows, n_cols,
                             BLOCKSIZE, NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, <the variant's constexprs>)
    linear:     see ``_linear.py``

A variant file defines its ``@triton.jit`` kernel (or, for a variant built on other libraries, a
``run`` function; both, where some configs launch the kernel with a workspace), its grid, its search
space and default config, and calls :func:`register`.
Adding a variant is adding one file to ``variants/``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping, Sequence

import torch

from . import _launch
from ._format import interpreter_enabled
from ._launch import LAUNCH_PARAMS

FAMILIES = ("dequantize", "linear")

Config = dict  # {"BLOCK": 1024, "TABLE_IN_REGISTERS": True, "num_warps": 4, "num_stages": 1}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel shape behind ``nf4_explorer.dequantize``.

    name:        registry key, e.g. "per_row".
    kernel:      the ``@triton.jit`` function (signature in this module's docstring).
    grid:        ``grid(args, config) -> tuple`` of program counts.
    space:       every tunable parameter -> the values to search (kernel constexprs and
                 num_warps/num_stages). The tuner searches the product, filtered by ``allowed``.
    default:     the config used when nothing is tuned (must be in ``space``).
    description: one line for tables and docs.
    allowed:     ``allowed(config, blocksize) -> bool``: configs that are invalid for a blocksize.
    min_capability: None for a plain Triton kernel (any GPU Triton targets, and the interpreter);
                 (major, minor) for a kernel that needs an NVIDIA GPU of that compute capability or
                 newer (a Gluon kernel: no interpreter, no AMD).
    family:      "dequantize" or "linear" (the argument object it takes: DequantArgs, LinearArgs).
    run:         ``run(args, config)``: for a variant without a Triton kernel of its own, or one whose
                 kernel some configs launch more than once (a workspace, a second kernel); given
                 with ``kernel``, it launches ``kernel`` itself.
    accepts:     ``accepts(args) -> str | None``: why this variant cannot take a problem (the
                 dispatcher and the tuner then skip it), or None.
    """

    name: str
    kernel: Callable | None
    grid: Callable[[object, Config], tuple] | None
    space: Mapping[str, Sequence]
    default: Mapping
    description: str
    allowed: Callable[[Config, int], bool] = lambda config, blocksize: True
    min_capability: tuple[int, int] | None = None
    family: str = "dequantize"
    run: Callable | None = None  # run(args, config): launches the variant (its kernel, if any, through _launch)
    accepts: Callable[[object], str | None] = lambda args: None  # why it cannot take a problem, or None

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this variant cannot run on ``device``, or None if it can."""
        if self.min_capability is None:
            return None
        needs = f"an NVIDIA GPU of compute capability {self.min_capability[0]}.{self.min_capability[1]} or newer"
        device = torch.device(device)
        if device.type != "cuda" or interpreter_enabled():
            where = "Triton's interpreter" if interpreter_enabled() else f"device {device}"
            return f"variant {self.name!r} needs {needs}; it cannot run on {where}: pick another variant"
        if torch.version.hip is not None or torch.cuda.get_device_capability(device) < self.min_capability:
            return (f"variant {self.name!r} needs {needs}; {torch.cuda.get_device_name(device)} is not one: "
                    "pick another variant")
        return None

    def configs(self, blocksize: int) -> list[Config]:
        """Every config of the search space that is valid for ``blocksize``."""
        names = list(self.space)
        configs = [dict(zip(names, values)) for values in itertools.product(*self.space.values())]
        return [c for c in configs if self.allowed(c, blocksize)]

    def default_config(self, blocksize: int) -> Config:
        """The default config, or the first valid one nearest to it for this blocksize."""
        config = dict(self.default)
        if self.allowed(config, blocksize):
            return config
        for candidate in self.configs(blocksize):
            if all(candidate[k] == v for k, v in config.items() if k in LAUNCH_PARAMS):
                return candidate
        return self.configs(blocksize)[0]

    def searches(self, key: str, value) -> bool:
        """Whether ``value`` is one of parameter ``key``'s values in the space. 512.0 == 512 and
        True == 1 in Python: the value must also be of its space's type."""
        return any(value == v and type(value) is type(v) for v in self.space[key])

    def check_config(self, config: Mapping, blocksize: int) -> None:
        """Raises ValueError naming the problem if ``config`` is not a valid config of this variant
        (launch parameters included: num_warps and num_stages must be values of the space)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config for variant {self.name!r} must be a dict, got {type(config).__name__}")
        unknown = set(config) - set(self.space)
        missing = set(self.space) - set(config)
        if unknown or missing:
            raise ValueError(
                f"config for variant {self.name!r} has unknown keys {sorted(unknown)} and lacks {sorted(missing)}: "
                f"its parameters are {list(self.space)}"
            )
        for key, value in config.items():
            if not self.searches(key, value):
                allowed = list(self.space[key])
                raise ValueError(f"{self.name}: {key}={value!r} is outside the search space {allowed}"
                                 + (f" (a {type(value).__name__}; the space holds {type(allowed[0]).__name__}s)"
                                    if any(value == v for v in allowed) else ""))
        if not self.allowed(dict(config), blocksize):
            raise ValueError(f"{self.name}: config {dict(config)} is not valid for blocksize {blocksize}")

    def launch(self, args, config: Mapping) -> None:
        """Runs this variant on ``args`` (its family's argument object) with ``config`` (no
        validation of the config: see check_config)."""
        if self.min_capability is not None:
            key = (self.name, args.device)
            if key not in _REASONS:
                _REASONS[key] = self.unavailable_reason(args.device)
            if _REASONS[key] is not None:
                raise ValueError(_REASONS[key])
        if self.run is not None:
            self.run(args, config)
            return
        _launch.launch(self.kernel, lambda c: self.grid(args, c), args.kernel_arguments(), config, args.device,
                       self.name)


# Shared memory a config of the tensor-core linear variants may ask for: the x and weight tiles of
# a step (8 * WORDS columns of 2 bytes), once per pipeline stage. 200 KiB leaves room under the
# H100/H200's 227 KiB; the tuner skips what a smaller GPU cannot launch.
SHARED_MEMORY_LIMIT = 200 * 1024


def fits_shared_memory(config: Config) -> bool:
    stage = (config["BLOCK_M"] + config["BLOCK_N"]) * 8 * config["WORDS"] * 2
    return max(config.get("num_stages", 1), 1) * stage <= SHARED_MEMORY_LIMIT


class VariantUnavailable(ImportError):
    """Raised by a variant module that cannot be defined with the installed Triton (the package
    then loads without it)."""


_REGISTRY: dict[str, Variant] = {}
_REASONS: dict[tuple, str | None] = {}  # (variant, device) -> unavailable_reason, asked once


def register(variant: Variant) -> Variant:
    """Adds ``variant`` to the registry (its name must be new) and returns it."""
    if variant.name in _REGISTRY:
        raise ValueError(f"a variant named {variant.name!r} is already registered")
    if variant.family not in FAMILIES:
        raise ValueError(f"{variant.name}: unknown family {variant.family!r}: use one of {FAMILIES}")
    if variant.kernel is None and variant.run is None:
        raise ValueError(f"{variant.name}: give kernel= (a Triton kernel), run=, or both")
    for key, values in variant.space.items():
        if variant.default.get(key) not in values:
            raise ValueError(f"{variant.name}: default {key}={variant.default.get(key)!r} is not in its space")
    _REGISTRY[variant.name] = variant
    return variant


def get(name: str) -> Variant:
    """The registered variant called ``name``; ValueError lists the names if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}: registered variants are {sorted(_REGISTRY)}") from None


def names(device: torch.device | str | None = None, family: str | None = "dequantize") -> list[str]:
    """The registered variants' names of ``family`` (None: every family); with a ``device``, only
    those that can run on it."""
    return sorted(name for name, variant in _REGISTRY.items()
                  if (family is None or variant.family == family)
                  and (device is None or variant.unavailable_reason(device) is None))
