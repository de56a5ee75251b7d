"""The one launcher: runs a variant's Triton kernel on a problem's arguments, with a fast path.

Every family's argument object (``DequantArgs``, ``LinearArgs``) builds its kernel arguments with
one method, ``kernel_arguments() -> KernelArguments``; the runtime, the tuner's exhaustive driver
and the ahead-of-time compiler all take them from there.

Fast path. Triton's JITFunction launch binds and specializes every argument on every call (~90 µs
per call measured on the H100 machine, triton 3.6), which dominates small problems. After the first
launch of a (kernel, config, problem) with 16-byte aligned pointers, the compiled kernel, its grid
and every argument but the data pointers are kept, and later calls go straight to its launcher.
The key holds everything Triton specializes on: the tensors' dtypes, every integer argument's value
(so the grid is fixed too), the problem's constexprs (blocksize, quant type, ...), the config and the
launch parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch
import triton

try:
    from triton import knobs
except ImportError:  # Triton before 3.4 has no knobs: every launch takes Triton's own path
    knobs = None

# Launch parameters that are not kernel arguments (maxnreg: a warp-specialized variant's register cap).
LAUNCH_PARAMS = ("num_warps", "num_stages", "maxnreg")


def launch_parameters(config: Mapping) -> dict:
    """A config's launch parameters as Triton's launch and compile take them (maxnreg only where set)."""
    parameters = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 1)}
    if "maxnreg" in config:
        parameters["maxnreg"] = config["maxnreg"]
    return parameters


def launch_options() -> dict:
    """Compile options every launch passes: no fused multiply-add, so a double-quantized absmax is
    ``code2[q] * absmax2`` and ``+ offset`` rounded separately, as bitsandbytes computes it."""
    return {"enable_fp_fusion": False}


@dataclasses.dataclass
class KernelArguments:
    """A kernel's arguments for one problem: ``runtime`` in signature order (tensors and ints), then
    the problem's constexprs by name (a variant's config adds its own)."""

    runtime: list
    constexprs: dict


_READY: dict[tuple, "_Ready"] = {}
_READY_LIMIT = 4096  # distinct problems kept; forgotten all at once beyond that (a re-launch refills)
_FAST_LAUNCH_OK = [knobs is not None]  # turned off for good if this Triton's compiled-kernel API differs


@dataclasses.dataclass(frozen=True)
class _Ready:
    """One compiled kernel, its grid and every launcher argument but the stream and the per-call
    data pointers: ``call(*grid, stream, *head, *runtime values, *tail)``."""

    call: Callable
    grid: tuple
    head: tuple  # function handle, launch flags and metadata, in the launcher's order
    tail: tuple  # the constexprs, in signature order
    stream: Callable
    device_index: int

    def launch(self, values: list) -> bool:
        """Launches on ``values`` (the runtime arguments, tensors as data pointers); False if a
        launch hook is set (profilers: the normal launch calls them) or Triton's launcher API differs."""
        if not (_no_hook(knobs.runtime.launch_enter_hook) and _no_hook(knobs.runtime.launch_exit_hook)):
            return False
        grid = self.grid
        try:
            self.call(grid[0], grid[1], grid[2], self.stream(self.device_index), *self.head, *values, *self.tail)
        except (AttributeError, TypeError):
            _turn_off_fast_launch()
            return False
        return True


def launch(kernel, grid: Callable[[Mapping], tuple], arguments: KernelArguments, config: Mapping,
           device: torch.device, name: str) -> None:
    """Launches ``kernel`` on ``arguments`` with ``config`` (constexprs and ``LAUNCH_PARAMS``).

    ``grid(config)`` gives the program counts. Tensors on another GPU than the current one are
    launched on their own GPU. No validation of the config here (see ``Variant.check_config``).
    """
    runtime = arguments.runtime
    key = values = None
    if device.type == "cuda":
        device_index = device.index if device.index is not None else torch.cuda.current_device()
        if device_index != torch.cuda.current_device():
            # Triton launches on the current device: switch to the tensors' one (several GPUs).
            with torch.cuda.device(device_index):
                return launch(kernel, grid, arguments, config, device, name)
        if _FAST_LAUNCH_OK[0]:
            values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in runtime]
            key = _ready_key(name, runtime, values, config, device_index, arguments.constexprs)
            ready = _READY.get(key) if key is not None else None
            if ready is not None and ready.launch(values):
                return
    constexprs = dict(arguments.constexprs)
    constexprs.update({k: v for k, v in config.items() if k not in LAUNCH_PARAMS})
    program_grid = grid(config)
    check_grid(program_grid, name)
    compiled = kernel[program_grid](*runtime, **launch_parameters(config), **constexprs, **launch_options())
    if key is not None and _FAST_LAUNCH_OK[0]:
        _remember(key, compiled, program_grid, len(runtime), constexprs, kernel.arg_names, device_index)


def ready_launch(name: str, arguments: KernelArguments, config: Mapping, device: torch.device) -> "_Ready | None":
    """The fast-path launch kept by an earlier :func:`launch` of ``name`` on these exact arguments
    (values, dtypes, alignment, config), or None. Holds no tensor: for a caller's own cache."""
    if device.type != "cuda" or not _FAST_LAUNCH_OK[0]:
        return None
    runtime = arguments.runtime
    values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in runtime]
    device_index = device.index if device.index is not None else torch.cuda.current_device()
    key = _ready_key(name, runtime, values, config, device_index, arguments.constexprs)
    return _READY.get(key) if key is not None else None


# CUDA's grid limits (HIP's are no smaller): 2^31 - 1 programs on the first axis, 65535 on the others.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(grid: tuple, name: str) -> None:
    """Raises ValueError if ``grid`` exceeds a launch's limits (a forced config on a huge weight)."""
    for axis, (programs, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if programs > limit:
            raise ValueError(f"variant {name!r} would launch {programs} programs on grid axis {axis} (the limit is "
                             f"{limit}) for this problem: pick a config with larger blocks, or another variant")


def _no_hook(hook) -> bool:
    # Triton 3.6 keeps launch hooks in a HookChain (empty: no hook); older versions use None.
    return hook is None or getattr(hook, "calls", None) == []


def _ready_key(name: str, runtime: list, values: list, config: Mapping, device_index: int,
               constexprs: Mapping) -> tuple | None:
    # Only 16-byte aligned pointers (what allocations give) take the fast path; Triton specializes
    # on alignment, so other pointers take the normal launch every time.
    dtypes = []
    for arg, value in zip(runtime, values):
        if isinstance(arg, torch.Tensor):
            if value & 15:
                return None
            dtypes.append(arg.dtype)
        else:
            dtypes.append(value)
    return (name, tuple(config.items()), tuple(constexprs.items()), device_index, *dtypes)


def _remember(key, compiled, grid, n_runtime, constexprs, arg_names, device_index) -> None:
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
            tail=tuple(constexprs[name] for name in arg_names[n_runtime:]),
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
