"""bitsandbytes' 4-bit format: the code tables, the state object, and input validation.

Everything here is plain Python and PyTorch; nothing touches a GPU at import.

Packed layout (bitsandbytes 0.50): the weight is flattened row-major; element 2i sits in the HIGH
nibble of byte i and element 2i+1 in the LOW nibble. Element e belongs to quantization block
e // blocksize, whose float32 scale is ``absmax[e // blocksize]``. With double quantization
(``compress_statistics=True``) that scale is itself stored as a uint8 code:
``absmax[b] = float32(code2[q[b]] * absmax2[b // blocksize2]) + offset`` (two roundings, no fused
multiply-add). The weight is ``float32(table[nibble] * absmax)`` cast once to the output dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from typing import Any

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
QUANT_TYPE_IDS = {"nf4": 0, "fp4": 1}  # the kernels' QUANT_TYPE constexpr
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32 and return it as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


# bitsandbytes' NF4 table (csrc/kernels.cu nf4_dequantization_lut; functional.get_4bit_type("nf4")).
NF4_TABLE = tuple(
    _f32(v)
    for v in (
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    )
)
# bitsandbytes' FP4 table: bit 3 is the sign, bits 0-2 pick a magnitude (csrc/kernels.cu
# fp4_dequantization_lut, which equals get_4bit_type("fp4") = values / 12 in float32).
_FP4_MAGNITUDES = tuple(_f32(v / 12.0) for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0))
FP4_TABLE = _FP4_MAGNITUDES + tuple(-m for m in _FP4_MAGNITUDES)
TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}


@dataclasses.dataclass
class QuantState:
    """The state of one 4-bit weight, with bitsandbytes' ``QuantState`` attribute names.

    absmax:    float32 [n_blocks] scales, or uint8 [n_blocks] codes when ``state2`` is set.
    shape:     torch.Size of the dequantized weight.
    dtype:     output dtype (float16, bfloat16 or float32).
    blocksize: elements per quantization block.
    quant_type: "nf4" or "fp4".
    code:      the 16-entry float32 table (informational: kernels use the constant table).
    offset:    0-dim float32 tensor added to the decoded absmax (double quant only).
    state2:    the nested state (double quant only): ``absmax`` float32 [ceil(n_blocks/blocksize)],
               ``code`` float32 [256], ``blocksize``.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    state2: "QuantState | None" = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


@dataclasses.dataclass
class DequantArgs:
    """A validated problem, ready for any variant's launcher.

    Every tensor is contiguous and on one device; ``packed`` holds ceil(n/2) uint8 and ``out`` n
    elements (any shapes: kernels index them flat). For 2-D variants the weight is seen as ``n_rows x n_cols``
    (the last dimension of the shape is ``n_cols``).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code2: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    out: torch.Tensor
    n: int
    n_rows: int
    n_cols: int
    blocksize: int
    nested_blocksize: int
    quant_type: str
    double_quant: bool
    out_dtype: torch.dtype
    device: torch.device
    shape: torch.Size  # the state's (the output's) shape

    def kernel_arguments(self):
        """The dequantize family's kernel interface (see _registry.py): runtime arguments in
        signature order, and the problem's constexprs (a variant's config adds its own)."""
        from ._launch import KernelArguments

        return KernelArguments(
            [self.packed, self.absmax, self.code2, self.absmax2, self.offset, device_table(self.quant_type, self.device),
             self.out, self.n, self.n_rows, self.n_cols],
            problem_constexprs(self.blocksize, self.nested_blocksize, self.quant_type, self.double_quant),
        )


def problem_constexprs(blocksize: int, nested_blocksize: int, quant_type: str, double_quant: bool) -> dict:
    """The constexprs every kernel of both families takes for a weight format."""
    return {
        "BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": nested_blocksize,
        "QUANT_TYPE": QUANT_TYPE_IDS[quant_type], "DOUBLE_QUANT": double_quant,
    }


_TABLES_ON_DEVICE: dict[tuple, torch.Tensor] = {}


def device_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry float32 table on ``device`` (cached; the table-gather decode reads it)."""
    key = (quant_type, device)
    table = _TABLES_ON_DEVICE.get(key)
    if table is None:
        table = _TABLES_ON_DEVICE[key] = torch.tensor(TABLES[quant_type], dtype=torch.float32, device=device)
    return table


# The register lookup tables of the LUT decode (``_decode.lut_values``) follow the 16 values and
# the 256 byte pairs in the linear family's table, one section per LUT_KINDS entry: 8 int32 words
# (the low and the high bytes of the 16 codes as 16-bit floats, four per word, for PTX ``prmt``)
# then the 16 float32 values that decode gives (read by the same kernels where PTX does not run).
LUT_OFFSET = 16 + 512
LUT_STRIDE = 24
# "bf16 to f32": bfloat16 codes widened to float32 by placing the two bytes on top of two bytes
# that repeat the sign (0x00 / 0xFF); a negative code is stored one ulp smaller in magnitude, so
# that the 0xFFFF below it brings it back to within 2^-16 ulp of its bfloat16 value.
LUT_KINDS = ("bf16 to f32", "f16", "bf16")


def _lut_section(values: torch.Tensor, kind: str) -> torch.Tensor:
    dtype = torch.float16 if kind == "f16" else torch.bfloat16
    bits = values.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    if kind == "bf16 to f32":
        magnitude = bits & 0x7FFF
        bits = torch.where(magnitude == 0, 0, torch.where(bits >= 0x8000, bits - 1, bits))
        high = bits >> 8
        fill = torch.where(high >= 0x80, 0xFFFF, 0)
        decoded = ((bits << 16) | fill).to(torch.int32).view(torch.float32)
    else:
        decoded = bits.to(torch.int16).view(dtype).to(torch.float32)

    def words(plane):
        plane = plane.view(4, 4)
        return (plane[:, 0] | plane[:, 1] << 8 | plane[:, 2] << 16 | plane[:, 3] << 24).to(torch.int32)

    planes = torch.cat((words(bits & 0xFF), words(bits >> 8)))
    return torch.cat((planes.view(torch.float32), decoded))


def device_pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The linear family's float32 table on ``device`` (cached): the 16 values, then for every byte
    b the pair (value of its high nibble, value of its low nibble) at [16 + 2b, 16 + 2b + 1], so
    one 64-bit load decodes two elements; then the LUT sections (LUT_OFFSET, LUT_STRIDE)."""
    key = ("pairs", quant_type, device)
    table = _TABLES_ON_DEVICE.get(key)
    if table is None:
        values = torch.tensor(TABLES[quant_type], dtype=torch.float32)
        byte = torch.arange(256)
        pairs = torch.stack((values[byte >> 4], values[byte & 15]), dim=1).reshape(-1)
        luts = [_lut_section(values, kind) for kind in LUT_KINDS]
        table = _TABLES_ON_DEVICE[key] = torch.cat((values, pairs, *luts)).to(device)
    return table


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _as_state_fields(state: Any) -> tuple:
    """Reads a QuantState (ours or bitsandbytes', duck-typed) and checks the fields exist."""
    try:
        fields = (state.absmax, state.shape, state.dtype, state.blocksize, state.quant_type)
    except AttributeError:
        missing = [a for a in ("absmax", "shape", "dtype", "blocksize", "quant_type") if not hasattr(state, a)]
        raise TypeError(
            f"state has no {', '.join(missing)}: pass the QuantState returned by nf4_explorer.quantize or "
            "bitsandbytes.functional.quantize_4bit (or a Params4bit's .quant_state)"
        ) from None
    absmax, shape, dtype, blocksize, quant_type = fields
    state2 = getattr(state, "state2", None)
    if state2 is None and getattr(state, "nested", False):
        raise ValueError("state.nested is True but state.state2 is None: the double-quant state is incomplete")
    if type(shape) is not torch.Size:
        if not isinstance(shape, (tuple, list)) or not all(_is_int(d) for d in shape):
            raise TypeError(f"state.shape must be a torch.Size or a sequence of ints, got {shape!r}: pass the "
                            "weight's shape, e.g. torch.Size([4096, 4096])")
        shape = torch.Size(shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"state.shape {tuple(shape)} has a negative dimension: pass the weight's shape")
    if not _is_int(blocksize):
        raise TypeError(f"state.blocksize must be an int, got {blocksize!r}: use one of {BLOCKSIZES}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"state.dtype must be a torch.dtype, got {dtype!r}: e.g. torch.bfloat16")
    if not isinstance(quant_type, str):
        raise TypeError(f"state.quant_type must be a string, got {quant_type!r}: use one of {QUANT_TYPES}")
    if state2 is not None:
        for field in ("absmax", "code", "blocksize"):
            value = getattr(state2, field, None)
            if value is None:
                raise TypeError(f"state.state2.{field} is missing or None: a double-quantized state needs the nested "
                                "absmax, its 256-entry code and its blocksize (bitsandbytes' QuantState has them)")
        for field in ("absmax", "code"):
            if not isinstance(getattr(state2, field), torch.Tensor):
                raise TypeError(f"state.state2.{field} must be a torch.Tensor, got {type(getattr(state2, field)).__name__}")
        if not _is_int(state2.blocksize):
            raise TypeError(f"state.state2.blocksize must be an int, got {state2.blocksize!r}")
    return absmax, shape, dtype, int(blocksize), quant_type, state2


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def overlapping(out: torch.Tensor, inputs: dict) -> str | None:
    """The name of the first of ``inputs`` whose memory overlaps ``out``'s, or None."""
    out_start, out_end = _byte_range(out)
    for name, t in inputs.items():
        if t is not None and t.numel():
            start, end = _byte_range(t)
            if start < out_end and out_start < end:
                return name
    return None


def nested_tensors(state: Any, device: torch.device) -> tuple:
    """(code2, absmax2, offset, nested_blocksize) of a double-quantized state, or placeholders
    (state.absmax three times and 256: the kernels never read them) without double quant. A
    Python-number offset becomes a float32 tensor on ``device``; a missing one stays None."""
    state2 = getattr(state, "state2", None)
    if state2 is None:
        return state.absmax, state.absmax, state.absmax, 256
    offset = state.offset
    if offset is not None and not isinstance(offset, torch.Tensor):
        offset = torch.tensor(float(offset), dtype=torch.float32, device=device)
    return state2.code, state2.absmax, offset, int(state2.blocksize)


def state_from_tensors(absmax, code2, absmax2, offset, shape, dtype, blocksize: int, nested_blocksize: int,
                       quant_type: str, double_quant: bool) -> QuantState:
    """The QuantState of a weight given as its tensors and scalars (the inverse of
    :func:`nested_tensors`; the custom ops and bitsandbytes' gemm_4bit op pass a state this way)."""
    state2 = None
    if double_quant:
        state2 = QuantState(absmax=absmax2, shape=absmax2.shape, dtype=torch.float32, blocksize=nested_blocksize,
                            code=code2)
    return QuantState(absmax=absmax, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                      quant_type=quant_type, offset=offset if double_quant else None, state2=state2)


def _raise_device_mismatch(device, absmax, code2, absmax2, offset, out):
    named = {"state.absmax": absmax, "state.state2.code": code2, "state.state2.absmax": absmax2,
             "state.offset": offset, "out": out}
    name, t = next((name, t) for name, t in named.items() if t is not None and t.device != device)
    raise ValueError(
        f"{name} is on {t.device} but packed is on {device}: move every tensor to one device "
        "(e.g. state.to(device) for a bitsandbytes QuantState)"
    )


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # Kernels read the weight's tensors flat, as aligned 32-bit words and vectors (phase_split reads
    # uint8 absmax codes as words): a non-contiguous tensor, or a view whose data starts off a 16-byte
    # boundary (a slice of a larger buffer), is copied to a buffer of its own (documented): one extra
    # pass, never a wrong result or a misaligned access.
    return t if t.is_contiguous() and not t.data_ptr() % 16 else t.clone(memory_format=torch.contiguous_format)


# The host path. A steady-state call validates the same weight again and again: the checks below
# cost ~6 µs on a fast host, more than the launch. ``prepare_weight`` keeps, per weight, the facts
# that validation reads (each tensor's data pointer, size, dtype and contiguity, the state's shape,
# dtype, blocksize and quant type) and the scalars it derived; a call whose facts are the same passes
# the same checks and gets those scalars with its own tensors. A changed weight or state (another
# tensor, a tensor given new data, another blocksize, ...) changes its facts and is validated anew.
# No tensor is kept, so the cache holds no memory alive.
_NO_SUBCLASS_DISPATCH = getattr(torch._C, "DisableTorchFunctionSubclass", contextlib.nullcontext)
_CHECKED: dict[tuple, tuple] = {}  # facts -> (the _SCALARS of its DequantArgs, the offset tensor made, if one was)
_CHECKED_LIMIT = 4096  # weights remembered; forgotten all at once beyond that (the next call re-validates)
_SCALARS = tuple(f.name for f in dataclasses.fields(DequantArgs))[6:]  # every field after packed ... out


def _tensor_facts(t) -> tuple:
    return t.data_ptr(), t.numel(), t.dtype, t.is_contiguous()


def _weight_facts(packed, absmax, code2, absmax2, offset, shape, dtype, blocksize, quant_type,
                  nested_blocksize) -> tuple:
    """What validation reads of a weight, hashable. Data pointers stand for devices (CUDA's unified
    addresses keep devices apart); a CPU weight adds whether the interpreter is on."""
    device = packed.get_device()
    facts = (*_tensor_facts(packed), device, *_tensor_facts(absmax), tuple(shape), dtype, type(blocksize),
             blocksize, quant_type, device < 0 and interpreter_enabled())
    if code2 is None:
        return facts
    offset_facts = _tensor_facts(offset) if isinstance(offset, torch.Tensor) else (type(offset), offset)
    return (*facts, *_tensor_facts(code2), *_tensor_facts(absmax2), *offset_facts, type(nested_blocksize),
            nested_blocksize)


def prepare_weight(packed: torch.Tensor, state: Any) -> DequantArgs:
    """``prepare(packed, state, None, allocate=False)``, cached per weight (see ``_CHECKED``): the
    validated weight of a linear problem, or of a dequantization before its output."""
    if type(packed) is not torch.Tensor and isinstance(packed, torch.nn.Parameter):
        # Params4bit: every attribute read goes through its __torch_function__ (~1 µs); ``.data`` read
        # once with subclass dispatch off gives the plain tensor (0.4 µs instead of 1.4 on the dev CPU).
        with _NO_SUBCLASS_DISPATCH():
            packed = packed.data
    state2 = getattr(state, "state2", None)
    if type(getattr(state, "shape", None)) is not torch.Size or (state2 is None and getattr(state, "nested", False)):
        # Not cached: a shape that may hold floats equal to a cached one's ints, an incomplete double
        # quant; the checks say what is wrong.
        return prepare(packed, state, None, allocate=False)
    try:
        nested = (state2.code, state2.absmax, state.offset, state2.blocksize) if state2 is not None else (None,) * 4
        fields = (state.absmax, *nested[:3], state.shape, state.dtype, state.blocksize, nested[3], state.quant_type,
                  state2 is not None)
    except AttributeError:  # a missing field: the checks name it
        return prepare(packed, state, None, allocate=False)
    return prepare_weight_tensors(packed, *fields, state=state)


def prepare_weight_tensors(packed, absmax, code2, absmax2, offset, shape, dtype, blocksize: int,
                           nested_blocksize: int, quant_type: str, double_quant: bool, state: Any = None) -> DequantArgs:
    """:func:`prepare_weight` for a weight given as its tensors and scalars (the custom ops and
    bitsandbytes' gemm_4bit op pass it so), without building a QuantState on the hot path.
    ``state``: the state these came from, if any (what a new weight's checks read, for their messages)."""
    try:
        facts = (_weight_facts(packed, absmax, code2, absmax2, offset, shape, dtype, blocksize, quant_type,
                               nested_blocksize) if double_quant else
                 _weight_facts(packed, absmax, None, None, None, shape, dtype, blocksize, quant_type, None))
        scalars = _CHECKED.get(facts)
    except (AttributeError, TypeError):  # not a tensor, an unhashable value: the checks below say what
        facts = scalars = None
    if not double_quant:
        code2 = absmax2 = offset = absmax  # placeholders the kernels never read (as nested_tensors gives)
    if scalars is not None:
        offset = offset if isinstance(offset, torch.Tensor) else scalars[-1]
        return DequantArgs(packed, absmax, code2, absmax2, offset, None, *scalars[:-1])  # None: out
    if state is None:
        state = state_from_tensors(absmax, code2, absmax2, offset, shape, dtype, blocksize, nested_blocksize,
                                   quant_type, double_quant)
    args = prepare(packed, state, None, allocate=False)
    args.out = None
    # A weight whose validation copied a tensor (non-contiguous, unaligned) is validated, and copied,
    # on every call; the others are remembered.
    copied = any(a is not b for a, b in zip((args.packed, args.absmax, args.code2, args.absmax2),
                                            (packed, absmax, code2, absmax2)))
    if facts is not None and not copied:
        if len(_CHECKED) >= _CHECKED_LIMIT:
            _CHECKED.clear()
        made_offset = None if isinstance(offset, torch.Tensor) else args.offset  # a Python number made a tensor
        _CHECKED[facts] = (*(getattr(args, name) for name in _SCALARS), made_offset)
    return args


def prepare(
    packed: torch.Tensor, state: Any, out: torch.Tensor | None, *, for_kernel: bool = True, allocate: bool = True
) -> DequantArgs:
    """Validates ``packed``/``state``/``out`` and returns the arguments every launcher takes.

    ``allocate=False`` leaves ``out`` empty when none is given (to inspect a problem without
    allocating its output). ``for_kernel=False`` skips the check that a Triton kernel can run on the device (the pure-PyTorch
    reference runs anywhere). Raises TypeError for wrong types and dtypes, ValueError for sizes,
    devices and unsupported settings; each message names the fix.
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}: allocate it with torch.empty")
    if packed.device.type == "meta":
        raise ValueError("packed is a meta tensor (no data): dequantize real tensors, or trace shapes with "
                         "torch.compile / FakeTensorMode, which use the custom op's fake implementation")
    absmax, shape, dtype, blocksize, quant_type, state2 = _as_state_fields(state)
    if packed.dtype != torch.uint8:
        raise TypeError(
            f"packed must be torch.uint8 (two 4-bit codes per byte), got {packed.dtype}; "
            "bitsandbytes' quant_storage other than uint8 can be viewed as bytes with packed.view(torch.uint8)"
        )
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unsupported quant_type {quant_type!r}: use one of {QUANT_TYPES}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize}: use one of {BLOCKSIZES}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"unsupported output dtype {dtype}: state.dtype must be float16, bfloat16 or float32")
    n = shape.numel()
    if n == 0:
        raise ValueError("state.shape has no elements: nothing to dequantize")
    n_bytes = (n + 1) // 2
    if packed.numel() != n_bytes:
        raise ValueError(
            f"packed has {packed.numel()} bytes but shape {tuple(shape)} needs ceil({n}/2) = {n_bytes}: "
            "pass the packed tensor that belongs to this state"
        )
    device = packed.device
    n_blocks = (n + blocksize - 1) // blocksize
    if not isinstance(absmax, torch.Tensor):
        raise TypeError(f"state.absmax must be a torch.Tensor, got {type(absmax).__name__}")
    if absmax.numel() != n_blocks:
        raise ValueError(
            f"state.absmax has {absmax.numel()} entries but {n} elements in blocks of {blocksize} need {n_blocks}: "
            "the state's blocksize or shape does not match its absmax"
        )
    code2, absmax2, offset, nested_blocksize = nested_tensors(state, device)
    if state2 is not None:
        if absmax.dtype != torch.uint8:
            raise TypeError(f"with double quantization state.absmax must hold uint8 codes, got {absmax.dtype}")
        if offset is None:
            raise ValueError("double-quantized state has no offset: state.offset must be set")
        if nested_blocksize <= 0 or nested_blocksize & (nested_blocksize - 1):
            raise ValueError(f"state.state2.blocksize must be a power of two, got {nested_blocksize}")
        if code2.numel() != 256 or code2.dtype != torch.float32:
            raise ValueError(
                f"state.state2.code must be 256 float32 entries, got {code2.numel()} of {code2.dtype}"
            )
        n_groups = (n_blocks + nested_blocksize - 1) // nested_blocksize
        if absmax2.numel() != n_groups or absmax2.dtype != torch.float32:
            raise ValueError(
                f"state.state2.absmax must be {n_groups} float32 entries for {n_blocks} blocks in groups of "
                f"{nested_blocksize}, got {absmax2.numel()} of {absmax2.dtype}"
            )
        if offset.numel() != 1 or offset.dtype != torch.float32:
            raise ValueError(f"state.offset must be one float32 value, got {offset.numel()} of {offset.dtype}")
    else:
        if absmax.dtype != torch.float32:
            raise TypeError(f"state.absmax must be float32 (or uint8 codes with state2), got {absmax.dtype}")
    others = (absmax, code2, absmax2, offset, out) if state2 is not None else (absmax, out)
    for t in others:
        if t is not None and t.device != device:
            _raise_device_mismatch(device, absmax, code2, absmax2, offset, out)
    if for_kernel and device.type == "cpu" and not interpreter_enabled():
        raise ValueError(
            "the tensors are on the CPU: Triton kernels need a GPU. Move them to CUDA, or run on the CPU "
            "in Triton's interpreter with TRITON_INTERPRET=1 set before triton is imported "
            "(nf4_explorer.reference_dequantize is the pure-PyTorch path)"
        )
    packed = _aligned(packed)
    n_cols = shape[-1] if len(shape) else 1
    # Kernels index flat memory through data pointers: contiguous tensors need no reshaping (views
    # cost microseconds per call, which matter at small shapes).
    args = DequantArgs(
        packed=packed,
        absmax=_aligned(absmax),
        code2=_aligned(code2),
        absmax2=_aligned(absmax2),
        offset=offset,
        out=None,
        n=n,
        n_rows=n // n_cols,
        n_cols=n_cols,
        blocksize=blocksize,
        nested_blocksize=nested_blocksize,
        quant_type=quant_type,
        double_quant=state2 is not None,
        out_dtype=dtype,
        device=device,
        shape=shape,
    )
    return attach_output(args, out, allocate)


def attach_output(args: DequantArgs, out: torch.Tensor | None, allocate: bool = True) -> DequantArgs:
    """Gives a validated weight its output: ``out`` once checked, else a new tensor of the state's shape
    (an empty one with ``allocate=False``). Raises naming the problem and the fix."""
    if out is None:
        args.out = torch.empty(args.shape if allocate else (0,), dtype=args.out_dtype, device=args.device)
        return args
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}: allocate it with torch.empty")
    if out.device != args.device:
        raise ValueError(f"out is on {out.device} but packed is on {args.device}: move every tensor to one device")
    if out.dtype != args.out_dtype:
        raise TypeError(f"out has dtype {out.dtype} but the state says {args.out_dtype}: allocate out with "
                        f"dtype={args.out_dtype}")
    if out.shape != args.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but the state says {tuple(args.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (the kernels write it flat): pass a contiguous tensor")
    # Programs read the inputs while others write out: an out that shares memory with an input
    # would be read after being overwritten (a wrong result, no error). Refused instead.
    clash = overlapping(out, {"packed": args.packed, "state.absmax": args.absmax, "state.state2.code": args.code2,
                              "state.state2.absmax": args.absmax2, "state.offset": args.offset})
    if clash is not None:
        raise ValueError(f"out overlaps {clash} in memory: the kernels would read what they already overwrote; "
                         "pass an out of its own (or none)")
    args.out = out
    return args
