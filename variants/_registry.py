"""The registry of kernel variants.

Every variant's kernel takes the same runtime arguments, so one launcher serves them all::

    kernel[grid](packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr,
                 n, n_rows, n_cols,
                 BLOCKSIZE, NESTED_BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT, <the variant's own constexprs>)

A variant file defines its ``@triton.jit`` kernel, its grid, its search space and default config,
and calls :func:`register`. Adding a variant is adding one file to ``variants/``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping, Sequence

import torch

from ._decode import QUANT_TYPE_IDS, launch_options
from ._format import TABLES, DequantArgs

# Launch parameters that are not kernel arguments.
LAUNCH_PARAMS = ("num_warps", "num_stages")

Config = dict  # {"BLOCK": 1024, "TABLE_IN_REGISTERS": True, "num_warps": 4, "num_stages": 1}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel shape behind ``variants.dequantize``.

    name:        registry key, e.g. "per_row".
    kernel:      the ``@triton.jit`` function (signature in this module's docstring).
    grid:        ``grid(args, config) -> tuple`` of program counts.
    space:       every tunable parameter -> the values to search (kernel constexprs and
                 num_warps/num_stages). The tuner searches the product, filtered by ``allowed``.
    default:     the config used when nothing is tuned (must be in ``space``).
    description: one line for tables and docs.
    allowed:     ``allowed(config, blocksize) -> bool``: configs that are invalid for a blocksize.
    """

    name: str
    kernel: Callable
    grid: Callable[[DequantArgs, Config], tuple]
    space: Mapping[str, Sequence]
    default: Mapping
    description: str
    allowed: Callable[[Config, int], bool] = lambda config, blocksize: True

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

    def check_config(self, config: Mapping, blocksize: int) -> None:
        """Raises ValueError naming the problem if ``config`` is not a valid config of this variant."""
        unknown = set(config) - set(self.space)
        missing = set(self.space) - set(config)
        if unknown or missing:
            raise ValueError(
                f"config for variant {self.name!r} has unknown keys {sorted(unknown)} and lacks {sorted(missing)}: "
                f"its parameters are {list(self.space)}"
            )
        for key, value in config.items():
            if key not in LAUNCH_PARAMS and value not in self.space[key]:
                raise ValueError(f"{self.name}: {key}={value!r} is outside the search space {list(self.space[key])}")
        if not self.allowed(dict(config), blocksize):
            raise ValueError(f"{self.name}: config {dict(config)} is not valid for blocksize {blocksize}")

    def launch(self, args: DequantArgs, config: Mapping) -> None:
        """Launches the kernel on ``args`` with ``config`` (no validation of the config: see check_config)."""
        grid = self.grid(args, config)
        runtime, constexprs = kernel_arguments(args)
        constexprs.update({k: v for k, v in config.items() if k not in LAUNCH_PARAMS})
        key = _fast_key(self.name, args, config) if args.device.type == "cuda" else None
        compiled = _COMPILED.get(key) if key is not None else None
        if compiled is not None and _fast_launch(compiled, grid, runtime, constexprs, self.kernel.arg_names,
                                                 args.device.index):
            return
        compiled = self.kernel[grid](
            *runtime, num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 1),
            **constexprs, **launch_options(),
        )
        if key is not None and _FAST_LAUNCH_OK[0]:
            _COMPILED[key] = compiled


# Fast launch path. Triton's JITFunction launch binds and specializes every argument on every call
# (~90 µs per call measured on the H100 machine, triton 3.6), which dominates small shapes. After
# the first launch of a (variant, config, problem specialization) the compiled kernel is kept and
# later calls go straight to its launcher. The key holds everything Triton specializes on: dtypes,
# constexprs, 16-byte alignment of every pointer, and ints equal to 1, divisible by 16 or >= 2^31.
_COMPILED: dict[tuple, object] = {}
_FAST_LAUNCH_OK = [True]  # turned off for good if this Triton's compiled-kernel API differs


def _int_spec(x: int) -> tuple:
    return (x == 1, x % 16 == 0, x >= 2**31)


def _fast_key(name: str, args: DequantArgs, config: Mapping) -> tuple | None:
    if not _FAST_LAUNCH_OK[0]:
        return None
    pointers = (args.packed, args.absmax, args.code2, args.absmax2, args.offset, args.out)
    return (
        name, tuple(config.items()), args.quant_type, args.blocksize, args.nested_blocksize, args.double_quant,
        args.out_dtype, args.absmax.dtype, args.device.index,
        tuple(t.data_ptr() % 16 == 0 for t in pointers),
        _int_spec(args.n), _int_spec(args.n_rows), _int_spec(args.n_cols),
    )


def kernel_arguments(args: DequantArgs) -> tuple[list, dict]:
    """The shared kernel interface for ``args``: runtime arguments in order, and the problem's
    constexprs (a variant's config adds its own)."""
    table = device_table(args.quant_type, args.device)
    runtime = [args.packed, args.absmax, args.code2, args.absmax2, args.offset, table, args.out,
               args.n, args.n_rows, args.n_cols]
    constexprs = {
        "BLOCKSIZE": args.blocksize, "NESTED_BLOCKSIZE": args.nested_blocksize,
        "QUANT_TYPE": QUANT_TYPE_IDS[args.quant_type], "DOUBLE_QUANT": args.double_quant,
    }
    return runtime, constexprs


def _fast_launch(compiled, grid, runtime: list, constexprs: dict, arg_names, device_index) -> bool:
    """Launches an already-compiled kernel directly; False (and the slow path from then on) if this
    Triton's CompiledKernel does not have the expected launcher."""
    try:
        from triton import knobs
        from triton.runtime import driver

        # Runtime arguments come first in every kernel's signature, then the constexprs by name.
        ordered = runtime + [constexprs[name] for name in arg_names[len(runtime):]]
        stream = driver.active.get_current_stream(device_index)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        metadata = compiled.launch_metadata(grid, stream, *ordered)
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *ordered)
        return True
    except (AttributeError, TypeError, ImportError):
        _FAST_LAUNCH_OK[0] = False
        _COMPILED.clear()
        return False


_REGISTRY: dict[str, Variant] = {}
_TABLES_ON_DEVICE: dict[tuple, torch.Tensor] = {}


def register(variant: Variant) -> Variant:
    """Adds ``variant`` to the registry (its name must be new) and returns it."""
    if variant.name in _REGISTRY:
        raise ValueError(f"a variant named {variant.name!r} is already registered")
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


def names() -> list[str]:
    return sorted(_REGISTRY)


def device_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry float32 table on ``device`` (cached; the table-gather decode reads it)."""
    key = (quant_type, device)
    table = _TABLES_ON_DEVICE.get(key)
    if table is None:
        table = _TABLES_ON_DEVICE[key] = torch.tensor(TABLES[quant_type], dtype=torch.float32, device=device)
    return table
