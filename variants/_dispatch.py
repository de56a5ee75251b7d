"""The dispatcher: which variant and config run for a problem of either family, and the eager calls.

Choice order: ``variant=``/``config=`` arguments, then ``$NF4_EXPLORER_VARIANT`` (dequantize) or
``$NF4_EXPLORER_LINEAR_VARIANT`` (linear), then the GPU's tuned file (see ``_cache.load_entries``
for which file and its tiers), else the built-in default. A dequantize problem matches the exact
shape, else the nearest size bucket with the same quant type, blocksize, double quant and dtype; a
linear problem the exact [N, K] at the nearest M bucket, else the nearest [N, K] (a float16 x takes a
bfloat16 entry where no float16 one is nearer, and the other way round), among the entries whose
variant takes the problem (``Variant.accepts``: a float16 x on a bfloat16 weight, say, which some
fused variants decline). A variant that cannot take a problem otherwise (forced, or the default)
is passed over for the family's always-valid fallback.
The choice is memoized per problem; on a GPU a steady call of a problem seen before goes further,
on its plan (``_plans``): no dispatcher and no validation of x, straight to the kept launch.

This module holds the eager paths; ``_api.py`` adds the torch.compile and autograd routes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Mapping

import torch

from . import _cache, _launch, _registry
from ._format import attach_output, device_pair_table, device_table, prepare, prepare_weight
from ._linear import LinearArgs, m_bucket, prepare_linear, runtime_arguments

ENV_VARIANT = {"dequantize": "NF4_EXPLORER_VARIANT", "linear": "NF4_EXPLORER_LINEAR_VARIANT"}

# Built-in defaults. dequantize: word_unpack, the H100 winner (32-bit word loads unpacked straight
# into 16-byte stores). linear: dequantize + cuBLAS, fastest of ours at every M on the H200 for the
# 58.7 M-weight Llama shapes (session 5: 83 µs at M = 1, the fused GEMV 94-101 µs, the fused GEMM
# slower still); the fused GEMV only for small weights at M <= 4, where it won (1024x4096 M = 1:
# 20 µs against 48 µs; 4096x4096: 38 against 51). docs/performance.md, session 5. Where it runs
# (an NVIDIA GPU of compute capability 8.0+, 16-bit x, whole blocks per row), the tensor-core
# GEMV up to M = 16: 28-41 µs at M = 1-16 on both Llama MLP shapes (bitsandbytes 34-114,
# dequantize + cuBLAS 83-87; session 8).
DEFAULT_VARIANT = "word_unpack"
LINEAR_MMA = "linear_mma_gemv"
LINEAR_MMA_MAX_M = 16
LINEAR_GEMV_MAX_M = 4
LINEAR_GEMV_MAX_WEIGHTS = 1 << 24
LINEAR_FALLBACK = "linear_dequantize"  # takes every problem
# A linear problem with no tuned entry for x's 16-bit dtype takes the other 16-bit dtype's: every
# fused kernel is the same code for both (the weight is decoded on x's grid), so a config tuned
# for one is a tuned guess for the other, where the untuned default runs dequantize + cuBLAS from
# M = 32 (H200, S11.2: float16 x on bfloat16 entries ran as fast as bfloat16 x, 14336x4096 M = 64
# 46.4 µs both, against 84.6 for dequantize + cuBLAS; docs/performance.md, session 11).
_TWIN_DTYPES = {"float16": "bfloat16", "bfloat16": "float16"}


@dataclasses.dataclass(frozen=True)
class Choice:
    """What runs for a problem, and why.

    reason is one of "argument", "environment", "tuned (exact)", "tuned (nearest bucket)",
    "tuned (nearest M bucket)", "tuned (nearest shape)", "tuned (other 16-bit dtype)", "default"; ``source`` names the tuned file
    or the override, ``detail`` the matched entry.
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

# The lean path of a steady linear call. After a dispatched call of a problem, the plan of that
# problem keeps what the call worked out under everything it read of x, the bias and the validated
# weight's format; a later call with the same facts passed the same checks and would decide the
# same, so it skips them (~150 Python calls fewer). Where the call was one launch through
# ``_launch``'s fast path, the plan keeps that compiled launch (grid, constexprs, the table's
# address) and a later call allocates its output and launches straight away; where the variant
# runs more (split-K's two launches and workspace, dequantize + cuBLAS), the plan keeps the choice
# and a later call goes straight to the variant's run. The weight is still validated on every call
# (``prepare_weight``'s cache), so a changed weight or state never reuses a stale plan; no tensor
# is kept.
_plans: dict[tuple, tuple] = {}
_PLANS_LIMIT = 4096  # forgotten all at once beyond that


def reset() -> None:
    """Forgets memoized choices and loaded files (after a re-tune, or in tests)."""
    _memo.clear()
    _entries_by_device.clear()
    _plans.clear()


def _device_entries(device: torch.device) -> tuple[str, list[dict]]:
    name = _cache.device_name(device)
    if name not in _entries_by_device:
        _entries_by_device[name] = _cache.load_entries(name, device)
    return _entries_by_device[name]


def _same_format(entry: dict, weight, dtype_name: str, family: str) -> bool:
    return (_cache.entry_family(entry) == family and entry["quant_type"] == weight.quant_type
            and entry["blocksize"] == weight.blocksize and entry["double_quant"] == weight.double_quant
            and entry["out_dtype"] == dtype_name)


def _choose_dequantize(args) -> Choice:
    source, entries = _device_entries(args.device)
    shape = [args.n_rows, args.n_cols] if args.n_rows > 1 else [args.n_cols]
    same_kind = [e for e in entries if _same_format(e, args, _cache.DTYPE_NAMES[args.out_dtype], "dequantize")]
    for entry in same_kind:
        if list(entry["shape"]) == shape:
            return Choice(entry["variant"], dict(entry["config"]), "tuned (exact)", source, _tier(entry, f"shape {shape}"))
    if same_kind:
        bucket = _cache.size_bucket(args.n)
        entry = min(same_kind, key=lambda e: (abs(e["size_bucket"] - bucket), -e["size_bucket"]))
        return Choice(
            entry["variant"], dict(entry["config"]), "tuned (nearest bucket)", source,
            _tier(entry, f"tuned shape {entry['shape']}, bucket {entry['size_bucket']} for {bucket}"),
        )
    variant = _registry.get(DEFAULT_VARIANT)
    return Choice(variant.name, variant.default_config(args.blocksize), "default")


def _choose_linear(args) -> Choice:
    source, entries = _device_entries(args.device)
    bucket = m_bucket(args.m)
    dtype = _cache.DTYPE_NAMES[args.dtype]
    dtypes = (dtype, _TWIN_DTYPES[dtype]) if dtype in _TWIN_DTYPES else (dtype,)
    same_kind = [e for e in entries if any(_same_format(e, args.weight, d, "linear") for d in dtypes)]
    # The nearest M bucket first (what wins depends on M far more than on the shape: an exact shape
    # tuned at M = 8 says nothing about M = 2048), then the exact shape, then x's own dtype over the
    # other 16-bit one, then the nearest shape in N and in K apart (an up projection is not a down
    # projection of the same size: split-K suits the one with few output tiles; session 11 measured
    # Qwen's 18944x3584 at M = 256 at 141.7 µs on the down projection's config).
    distance = lambda e: abs(math.log2(e["m_bucket"]) - math.log2(bucket))  # noqa: E731
    far = lambda e: (abs(math.log2(e["shape"][0] / max(args.n, 1)))  # noqa: E731
                     + abs(math.log2(e["shape"][1] / max(args.k, 1))))
    rank = lambda e: (distance(e), list(e["shape"]) != [args.n, args.k], e["out_dtype"] != dtype,  # noqa: E731
                      far(e), -e["size_bucket"], -e["m_bucket"])
    # Among the entries whose variant takes the problem (a float16 x on a bfloat16 weight, say).
    runnable = _registry.names(args.device, family="linear")
    takes = {name: name in runnable and _registry.get(name).accepts(args) is None
             for name in {e["variant"] for e in same_kind}}
    passed = ""  # what explain_linear says of a nearer entry passed over
    nearest = min(same_kind, key=rank) if same_kind else None
    if nearest is not None and not takes[nearest["variant"]]:
        passed = (f"; the nearer {nearest['variant']} entry (shape {nearest['shape']}, M bucket "
                  f"{nearest['m_bucket']}) cannot take this problem")
    same_kind = [e for e in same_kind if takes[e["variant"]]]
    if same_kind:
        entry = min(same_kind, key=rank)
        if entry["out_dtype"] != dtype:
            return Choice(entry["variant"], dict(entry["config"]), "tuned (other 16-bit dtype)", source,
                          _tier(entry, f"a {entry['out_dtype']} entry, shape {entry['shape']} M bucket "
                                       f"{entry['m_bucket']}, for {dtype} x [{args.n}, {args.k}] M = {args.m}{passed}"))
        if list(entry["shape"]) == [args.n, args.k]:
            reason = "tuned (exact)" if entry["m_bucket"] == bucket else "tuned (nearest M bucket)"
            return Choice(entry["variant"], dict(entry["config"]), reason, source,
                          _tier(entry, f"shape [{args.n}, {args.k}], M bucket {entry['m_bucket']} for M = "
                                       f"{args.m}{passed}"))
        return Choice(entry["variant"], dict(entry["config"]), "tuned (nearest shape)", source,
                      _tier(entry, f"tuned shape {entry['shape']} M bucket {entry['m_bucket']} for "
                                   f"[{args.n}, {args.k}] M = {args.m}{passed}"))
    if args.m <= LINEAR_MMA_MAX_M and LINEAR_MMA in runnable:
        variant = _registry.get(LINEAR_MMA)
        if variant.accepts(args) is None:
            return Choice(variant.name, variant.default_config(args.blocksize), "default", detail=passed[2:])
    small = args.m <= LINEAR_GEMV_MAX_M and args.n * args.k <= LINEAR_GEMV_MAX_WEIGHTS
    variant = _registry.get("linear_gemv" if small else LINEAR_FALLBACK)
    return Choice(variant.name, variant.default_config(args.blocksize), "default", detail=passed[2:])


def _tier(entry: dict, detail: str) -> str:
    """The detail of a tuned choice, with the Triton it was tuned with where that is not the running one."""
    tuned = entry.get("triton_version")
    if tuned and tuned != _cache.triton_minor():
        return f"{detail}; tuned with Triton {tuned}"
    return detail


def _problem_key(args, family: str) -> tuple:
    if family == "linear":  # x's alignment too: variants decline an x off a 16-byte (cp.async) or 4-byte boundary
        w = args.weight
        return (args.device, family, w.quant_type, w.blocksize, w.double_quant, w.out_dtype, args.dtype, args.n,
                args.k, m_bucket(args.m), args.x2d.data_ptr() % 16)
    return (args.device, family, args.quant_type, args.blocksize, args.double_quant, args.out_dtype, args.n_rows,
            args.n_cols)


def _resolve(args, family: str, variant: str | None, config: Mapping | None) -> tuple[Choice, "_registry.Variant"]:
    if variant is not None or config is not None:
        if variant is None:
            raise ValueError("config= needs variant=: a config belongs to one variant")
        chosen = _family_variant(variant, family)
        config = dict(config) if config is not None else chosen.default_config(args.blocksize)
        chosen.check_config(config, args.blocksize)
        reason = chosen.accepts(args)
        if reason is not None:
            raise ValueError(reason)
        return Choice(chosen.name, config, "argument"), chosen
    key = _problem_key(args, family)
    resolved = _memo.get(key)
    if resolved is None:
        resolved = _memo[key] = _decide(args, family)
    return resolved


def _decide(args, family: str) -> tuple[Choice, "_registry.Variant"]:
    forced = os.environ.get(ENV_VARIANT[family])
    if forced:
        variant = _family_variant(forced, family)
        choice = Choice(variant.name, variant.default_config(args.blocksize), "environment", f"${ENV_VARIANT[family]}")
    else:
        choice = _choose_linear(args) if family == "linear" else _choose_dequantize(args)
    chosen = _registry.get(choice.variant)
    refusal = chosen.accepts(args)
    if refusal is not None:
        return _fallback(args, family, f"{choice.variant} cannot take this problem: {refusal}")
    return choice, chosen


def _fallback(args, family: str, why: str) -> tuple[Choice, "_registry.Variant"]:
    """The family's built-in default, which takes every problem, with why it replaced the choice."""
    variant = _registry.get(LINEAR_FALLBACK if family == "linear" else DEFAULT_VARIANT)
    return Choice(variant.name, variant.default_config(args.blocksize), "default", detail=why), variant


def _run(args, family: str, choice: Choice, chosen: "_registry.Variant") -> None:
    """Launches the choice. A tuned entry that fails under this software (it does not compile or
    launch, e.g. after a Triton upgrade) is dropped with one warning and the call goes on with the
    built-in default: a tuned file never breaks a call."""
    try:
        chosen.launch(args, choice.config)
    except Exception as exc:
        if not choice.reason.startswith("tuned"):
            raise
        default, fallback = _memo[_problem_key(args, family)] = _fallback(
            args, family, f"tuned {choice.variant} failed here: {type(exc).__name__}")
        warnings.warn(f"nf4-explorer: the tuned {choice.variant} {dict(choice.config)} from {choice.source} failed "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); using the "
                      f"built-in default for this problem. Re-run `nf4-explorer tune`.", RuntimeWarning, stacklevel=3)
        fallback.launch(args, default.config)


def _family_variant(name: str, family: str) -> "_registry.Variant":
    variant = _registry.get(name)
    if variant.family != family:
        raise ValueError(f"variant {name!r} is a {variant.family} variant, not a {family} one: "
                         f"{family} variants are {_registry.names(family=family)}")
    return variant


def dequantize_eager(packed: torch.Tensor, state: Any, *, out: torch.Tensor | None = None,
                     variant: str | None = None, config: Mapping | None = None, weight=None) -> torch.Tensor:
    """``nf4_explorer.dequantize`` outside torch.compile (see ``_api.dequantize`` for the contract).
    ``weight``: as for :func:`linear_eager`."""
    weight = weight if weight is not None else prepare_weight(packed, state)
    lean = out is None and variant is None and config is None and weight.device.type == "cuda"
    if lean:
        planned = _run_dequantize_plan(weight, None)
        if planned is not None:
            return planned
    args = attach_output(weight, out)
    _run(args, "dequantize", *_resolve(args, "dequantize", variant, config))
    if lean:
        _remember_dequantize_plan(args)
    return args.out


def dequantize_prepared(args) -> torch.Tensor:
    """Dequantizes an already validated problem (``DequantArgs`` with its ``out``) through the
    dispatcher: for a caller that validated the weight and its output already (linear_dequantize)."""
    lean = args.device.type == "cuda"
    if lean and _run_dequantize_plan(args, args.out) is not None:
        return args.out
    _run(args, "dequantize", *_resolve(args, "dequantize", None, None))
    if lean:
        _remember_dequantize_plan(args)
    return args.out


# The lean path of a steady dequantization, as for linear (see ``_plans``): a dispatched call of a
# weight format and shape whose one launch went through ``_launch``'s fast path keeps that launch;
# a later call of the same format and shape (its weight validated by ``prepare_weight``, its output
# new or validated by the caller) launches it with its own pointers.
def _dequantize_plan_key(weight) -> tuple:
    return ("dequantize", weight.shape, weight.out_dtype, weight.blocksize, weight.nested_blocksize,
            weight.quant_type, weight.double_quant, weight.device)


def _remember_dequantize_plan(args) -> None:
    choice, chosen = _resolve(args, "dequantize", None, None)  # what ran (a failed tuned entry fell back)
    ready = (_launch.ready_launch(chosen.name, args.kernel_arguments(), choice.config, args.device)
             if chosen.kernel is not None and chosen.run is None else None)
    if ready is not None:
        _keep(_dequantize_plan_key(args), (ready, device_table(args.quant_type, args.device).data_ptr()))


def _run_dequantize_plan(weight, out: torch.Tensor | None) -> torch.Tensor | None:
    """Launches the plan of ``weight``'s format and shape into ``out`` (a new tensor if None); None
    if there is none or it cannot (another current GPU, an unaligned pointer, a profiler's hook)."""
    plan = _plans.get(_dequantize_plan_key(weight))
    if plan is None:
        return None
    ready, table = plan
    if out is None:
        out = torch.empty(weight.shape, dtype=weight.out_dtype, device=weight.device)
    values = [weight.packed, weight.absmax, weight.code2, weight.absmax2, weight.offset, table, out,
              weight.n, weight.n_rows, weight.n_cols]
    return out if _replay(ready, values, 7) else None


def linear_eager(x: torch.Tensor, packed: torch.Tensor, state: Any, bias: torch.Tensor | None = None, *,
                 variant: str | None = None, config: Mapping | None = None, weight=None) -> torch.Tensor:
    """``nf4_explorer.linear``'s forward, no autograd (see ``_api.linear`` for the contract).
    ``weight``: the weight validated already (``_format.prepare_weight_tensors``), for callers that
    hold tensors rather than a state (the custom op, bitsandbytes' gemm_4bit op)."""
    key = None
    if variant is None and config is None and type(x) is torch.Tensor and x.is_cuda:
        if weight is None:
            weight = prepare_weight(packed, state)
        key = _plan_key(x, weight, bias)
        plan = _plans.get(key) if key is not None else None
        if plan is not None:
            out = _run_plan(plan, x, weight, bias)
            if out is not None:
                return out
    args = prepare_linear(x, packed, state, bias, weight=weight)
    if args.m == 0:
        return x.new_empty((*x.shape[:-1], args.n))
    _run(args, "linear", *_resolve(args, "linear", variant, config))
    # A plan from a call that needed no copy of x or bias, and whose x and bias were aligned (a plan
    # does not look at alignment: one made on an unaligned x would keep its fallback for aligned
    # calls, one on an unaligned bias no kept launch).
    if (key is not None and x.is_contiguous() and args.bias is bias and not x.data_ptr() % 16
            and (bias is None or not bias.data_ptr() % 16)):
        _remember_plan(key, args)
    return args.result()


def _plan_key(x: torch.Tensor, weight, bias: torch.Tensor | None) -> tuple | None:
    """Everything ``prepare_linear`` and the dispatcher read of a problem, but the data pointers;
    None for a bias that is neither a plain tensor nor a Parameter (a module's bias, as Qwen's q/k/v
    projections pass it): another subclass's attribute reads may differ, and its checks say what is wrong."""
    if bias is not None and type(bias) is not torch.Tensor and type(bias) is not torch.nn.Parameter:
        return None
    return (x.dtype, x.shape, x.is_contiguous(), x.get_device(), tuple(weight.shape), weight.blocksize,
            weight.nested_blocksize, weight.quant_type, weight.double_quant, weight.out_dtype, weight.device,
            None if bias is None else (bias.dtype, bias.shape, bias.get_device(), bias.is_contiguous()))


def _remember_plan(key: tuple, args) -> None:
    choice, chosen = _resolve(args, "linear", None, None)  # what ran (a failed tuned entry fell back)
    # A variant with a run of its own made the family's one launch under its name only in some
    # configs (linear_lut_gemm without split-K): its other launches go by other names, so
    # ready_launch finds nothing for them, and the plan keeps the choice instead.
    ready = (_launch.ready_launch(chosen.name, args.kernel_arguments(), choice.config, args.device)
             if chosen.kernel is not None else None)
    shape = None if args.x.dim() == 2 else (*args.x.shape[:-1], args.n)
    table = device_pair_table(args.weight.quant_type, args.device).data_ptr() if ready is not None else None
    _keep(key, (ready, args.m, args.n, args.k, table, shape, choice, chosen))


def _run_plan(plan: tuple, x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """Launches a remembered plan; None if it cannot (see :func:`_replay`)."""
    ready, m, n, k, table, shape, choice, chosen = plan
    x2d = x if shape is None else x.view(m, k)
    if ready is None:  # the variant's own run, on the checks and choice of the planned call
        args = LinearArgs(x=x, x2d=x2d, weight=weight, bias=bias, out=None, m=m, n=n, k=k, dtype=x.dtype,
                          device=weight.device)
        chosen.launch(args, choice.config)
        return args.result()
    out = x2d.new_empty((m, n))
    if not _replay(ready, runtime_arguments(x2d.data_ptr(), weight, table, bias, out, m, n, k), 9):
        return None
    return out if shape is None else out.view(shape)


def _keep(key: tuple, plan: tuple) -> None:
    """Keeps a plan of either family (all are forgotten beyond ``_PLANS_LIMIT``: calls plan anew)."""
    if len(_plans) >= _PLANS_LIMIT:
        _plans.clear()
    _plans[key] = plan


def _replay(ready, values: list, pointers: int) -> bool:
    """Launches a plan's kept launch on ``values``, the kernel's runtime arguments, whose first
    ``pointers`` are tensors or data pointers (tensors are replaced by theirs). False if it cannot:
    another current GPU (the normal launch switches to the tensors' one), an unaligned pointer, a
    profiler's launch hook."""
    if ready.device_index != torch.cuda.current_device():
        return False
    aligned = 0
    for i in range(pointers):
        value = values[i]
        if type(value) is not int:
            values[i] = value = value.data_ptr()
        aligned |= value
    return not aligned & 15 and ready.launch(values)


def explain(packed: torch.Tensor, state: Any, *, variant: str | None = None, config: Mapping | None = None) -> Choice:
    """The :class:`Choice` that ``dequantize(packed, state, variant=..., config=...)`` would run."""
    args = prepare(packed, state, None, allocate=False)
    return _resolve(args, "dequantize", variant, config)[0]


def explain_linear(x: torch.Tensor, packed: torch.Tensor, state: Any, *, variant: str | None = None,
                   config: Mapping | None = None) -> Choice:
    """The :class:`Choice` that ``linear(x, packed, state, variant=..., config=...)`` would run."""
    return _resolve(prepare_linear(x, packed, state), "linear", variant, config)[0]
