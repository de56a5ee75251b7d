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
import triton

try:
    from triton import knobs
except ImportError:  # Triton before 3.4 has no knobs: every launch takes Triton's own path
    knobs = None

from ._decode import QUANT_TYPE_IDS, launch_options
from ._format import TABLES, DequantArgs, interpreter_enabled

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
    min_capability: None for a plain Triton kernel (any GPU Triton targets, and the interpreter);
                 (major, minor) for a kernel that needs an NVIDIA GPU of that compute capability or
                 newer (a Gluon kernel: no interpreter, no AMD).
    """

    name: str
    kernel: Callable
    grid: Callable[[DequantArgs, Config], tuple]
    space: Mapping[str, Sequence]
    default: Mapping
    description: str
    allowed: Callable[[Config, int], bool] = lambda config, blocksize: True
    min_capability: tuple[int, int] | None = None

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
        key = None
        if args.packed.is_cuda:
            device_index = args.packed.get_device()
            if device_index != torch.cuda.current_device():
                # Triton launches on the current device: switch to the tensors' one (several GPUs).
                with torch.cuda.device(args.device):
                    return self.launch(args, config)
            pointers = (args.packed.data_ptr(), args.absmax.data_ptr(), args.code2.data_ptr(),
                        args.absmax2.data_ptr(), args.offset.data_ptr(), args.out.data_ptr())
            key = _ready_key(self.name, args, config, pointers, device_index)
            ready = _READY.get(key) if key is not None else None
            if ready is not None and ready.launch(pointers):
                return
        if self.min_capability is not None:
            reason = self.unavailable_reason(args.device)
            if reason is not None:
                raise ValueError(reason)
        grid = self.grid(args, config)
        runtime, constexprs = kernel_arguments(args)
        constexprs.update({k: v for k, v in config.items() if k not in LAUNCH_PARAMS})
        compiled = self.kernel[grid](
            *runtime, num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 1),
            **constexprs, **launch_options(),
        )
        if key is not None and _FAST_LAUNCH_OK[0]:
            _remember(key, compiled, grid, runtime, constexprs, self.kernel.arg_names, device_index)


# Fast launch path. Triton's JITFunction launch binds and specializes every argument on every call
# (~90 µs per call measured on the H100 machine, triton 3.6), which dominates small shapes. After
# the first launch of a (variant, config, problem) with aligned pointers, the compiled kernel and
# everything but the six data pointers are kept, and later calls go straight to its launcher.
# The key holds everything Triton specializes on: dtypes, constexprs, the sizes (so the grid is
# fixed too) and the pointers' 16-byte alignment (the fast path takes aligned pointers only).
_READY: dict[tuple, "_Ready"] = {}
_READY_LIMIT = 4096  # distinct problems kept; forgotten all at once beyond that (a re-launch refills)
_FAST_LAUNCH_OK = [knobs is not None]  # turned off for good if this Triton's compiled-kernel API differs


@dataclasses.dataclass(frozen=True)
class _Ready:
    """One compiled kernel, its grid and every launcher argument but the stream and the per-call
    data pointers: ``call(*grid, stream, *head, <pointers and table>, *tail)``."""

    call: Callable
    grid: tuple
    head: tuple  # function handle, launch flags and metadata, in the launcher's order
    table: torch.Tensor  # kept alive for table_ptr
    table_ptr: int
    tail: tuple  # n, n_rows, n_cols and the constexprs, in signature order
    stream: Callable
    device_index: int

    def launch(self, pointers: tuple) -> bool:
        """Launches on ``pointers`` (packed, absmax, code2, absmax2, offset, out); False if a launch
        hook is set (profilers: the normal launch calls them) or Triton's launcher API differs."""
        if not (_no_hook(knobs.runtime.launch_enter_hook) and _no_hook(knobs.runtime.launch_exit_hook)):
            return False
        p = pointers
        try:
            self.call(self.grid[0], self.grid[1], self.grid[2], self.stream(self.device_index), *self.head,
                      p[0], p[1], p[2], p[3], p[4], self.table_ptr, p[5], *self.tail)
        except (AttributeError, TypeError):
            _turn_off_fast_launch()
            return False
        return True


def _no_hook(hook) -> bool:
    # Triton 3.6 keeps launch hooks in a HookChain (empty: no hook); older versions use None.
    return hook is None or getattr(hook, "calls", None) == []


def _ready_key(name: str, args: DequantArgs, config: Mapping, pointers: tuple, device_index: int) -> tuple | None:
    # Only 16-byte aligned pointers (what allocations give) take the fast path; Triton specializes
    # on alignment, so other pointers take the normal launch every time.
    if not _FAST_LAUNCH_OK[0] or (pointers[0] | pointers[1] | pointers[2] | pointers[3] | pointers[4] | pointers[5]) & 15:
        return None
    return (name, tuple(config.items()), args.quant_type, args.blocksize, args.nested_blocksize, args.double_quant,
            args.out_dtype, args.absmax.dtype, device_index, args.n, args.n_rows, args.n_cols)


def _remember(key, compiled, grid, runtime, constexprs, arg_names, device_index) -> None:
    try:
        from triton.runtime import driver

        run = compiled.run
        if (triton.__version__.startswith("3.6.") and run.global_scratch_size == 0
                and run.profile_scratch_size == 0):
            # Triton 3.6's CudaLauncher.__call__ only adds these arguments (no scratch memory):
            # calling its C launch directly saves ~2 µs per call on the H100 machine.
            call = run.launch
            head = (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                    compiled.packed_metadata, None, None, None)
        else:
            # The arguments Triton's own JIT launch passes (launch metadata and hooks: none).
            call = run
            head = (compiled.function, compiled.packed_metadata, None, None, None)
        ready = _Ready(
            call=call, grid=tuple(grid) + (1,) * (3 - len(grid)), head=head,
            table=runtime[5], table_ptr=runtime[5].data_ptr(),
            tail=tuple(runtime[7:]) + tuple(constexprs[name] for name in arg_names[len(runtime):]),
            stream=driver.active.get_current_stream, device_index=device_index,
        )
    except AttributeError:
        _turn_off_fast_launch()
        return
    if len(_READY) >= _READY_LIMIT:
        _READY.clear()
    _READY[key] = ready


def _turn_off_fast_launch() -> None:
    _FAST_LAUNCH_OK[0] = False
    _READY.clear()


def kernel_arguments(args: DequantArgs) -> tuple[list, dict]:
    """The shared kernel interface for ``args``: runtime arguments in order, and the problem's
    constexprs (a variant's config adds its own)."""
    table = device_table(args.quant_type, args.device)
    runtime = [args.packed, args.absmax, args.code2, args.absmax2, args.offset, table, args.out,
               args.n, args.n_rows, args.n_cols]
    return runtime, problem_constexprs(args.blocksize, args.nested_blocksize, args.quant_type, args.double_quant)


def problem_constexprs(blocksize: int, nested_blocksize: int, quant_type: str, double_quant: bool) -> dict:
    """The constexprs every kernel takes for a problem (a variant's config adds its own)."""
    return {
        "BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": nested_blocksize,
        "QUANT_TYPE": QUANT_TYPE_IDS[quant_type], "DOUBLE_QUANT": double_quant,
    }


class VariantUnavailable(ImportError):
    """Raised by a variant module that cannot be defined with the installed Triton (the package
    then loads without it)."""


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


def names(device: torch.device | str | None = None) -> list[str]:
    """The registered variants' names; with a ``device``, only those that can run on it."""
    return sorted(name for name, variant in _REGISTRY.items()
                  if device is None or variant.unavailable_reason(device) is None)


def device_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry float32 table on ``device`` (cached; the table-gather decode reads it)."""
    key = (quant_type, device)
    table = _TABLES_ON_DEVICE.get(key)
    if table is None:
        table = _TABLES_ON_DEVICE[key] = torch.tensor(TABLES[quant_type], dtype=torch.float32, device=device)
    return table
