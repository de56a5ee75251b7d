"""Pure-PyTorch quantization and the one reference dequantization (ground truth for every test).

``quantize`` follows bitsandbytes' CUDA kernels step by step (kQuantizeBlockwise with the NF4/FP4
decision trees, then 8-bit blockwise quantization of the centred absmax with dQuantize's binary
search), so on the same device it produces the same bytes and state as
``bitsandbytes.functional.quantize_4bit``. Runs on CPU or GPU.
"""

from __future__ import annotations

import functools

import torch

from ._format import BLOCKSIZES, OUT_DTYPES, QUANT_TYPES, TABLES, QuantState, prepare

NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256


@functools.lru_cache(maxsize=None)
def _dynamic_map_list() -> tuple[float, ...]:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True, 7, 8)), same ops."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return tuple(data)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry float32 code map bitsandbytes uses for double quantization."""
    return torch.tensor(_dynamic_map_list(), dtype=torch.float32, device=device)


def table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 NF4 or FP4 table, indexed by the 4-bit code."""
    return torch.tensor(TABLES[quant_type], dtype=torch.float32, device=device)


def _nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """dQuantizeNF4's decision tree (NaN falls through to code 0, as on the GPU)."""
    w = torch.where
    hi = w(x > 0.3893125355243683,
           w(x > 0.6427869200706482, w(x > 0.8614784181118011, 15, 14), w(x > 0.5016634166240692, 13, 12)),
           w(x > 0.2035212516784668, w(x > 0.2920137718319893, 11, 10), w(x > 0.1202552504837513, 9, 8)))
    lo = w(x > -0.33967943489551544,
           w(x > -0.13791173323988914, w(x > -0.045525018125772476, 7, 6), w(x > -0.23460740596055984, 5, 4)),
           w(x > -0.6106329262256622, w(x > -0.4599952697753906, 3, 2), w(x > -0.8480964004993439, 1, 0)))
    return w(x > 0.03979014977812767, hi, lo)


def _fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """dQuantizeFP4's decision tree: sign in bit 3, magnitude code in bits 0-2."""
    w = torch.where
    sign = w(x < 0, 8, 0)
    a = x.abs()
    mag = w(a > 0.29166667,
            w(a > 0.583333, w(a > 0.8333333, 3, 2), w(a > 0.4166667, 5, 4)),
            w(a > 0.0859375, w(a > 0.20833333, 7, 6), w(a > 0.00260417, 1, 0)))
    return mag + sign


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads ``flat`` (float32) with zeros to whole blocks; returns (blocks [B, blocksize], absmax [B])."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def _dquantize(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' dQuantize<0>: binary search over the sorted 256-entry code, then the nearer
    neighbour by midpoint. Vectorized; returns int64 codes."""
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        gt = x > val
        lower_pivot = torch.where(gt, pivot, lower_pivot)
        lower = torch.where(gt, val, lower)
        upper_pivot = torch.where(gt, upper_pivot, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    below = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(x > val, above, below)


def quantize(
    weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4"
) -> tuple[torch.Tensor, QuantState]:
    """Quantizes ``weight`` to bitsandbytes' 4-bit format in pure PyTorch (CPU or GPU).

    Args:
        weight: float16, bfloat16 or float32 tensor of any shape.
        blocksize: elements per absmax block, one of 32, 64, ..., 4096.
        double_quant: quantize the absmax too (bitsandbytes' ``compress_statistics=True``).
        quant_type: "nf4" or "fp4".

    Returns:
        ``(packed, state)``: packed is uint8 [ceil(n/2), 1] (bitsandbytes' shape), element 2i in the
        high nibble of byte i; state is a :class:`QuantState` whose dtype is ``weight.dtype``.

    Raises:
        TypeError for a non-tensor or unsupported dtype, ValueError for blocksize/quant_type/empty.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in OUT_DTYPES:
        raise TypeError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize}: use one of {BLOCKSIZES}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unsupported quant_type {quant_type!r}: use one of {QUANT_TYPES}")
    if weight.numel() == 0:
        raise ValueError("weight is empty: nothing to quantize")
    device = weight.device
    n = weight.numel()
    blocks, absmax = _blockwise_absmax(weight.reshape(-1).float(), blocksize)
    # The kernel multiplies by the reciprocal (1.0f / absmax), not divides: same here, same bits.
    scaled = blocks * (1.0 / absmax)[:, None]
    codes = (_nf4_codes if quant_type == "nf4" else _fp4_codes)(scaled).reshape(-1)
    n_bytes = (n + 1) // 2
    codes = codes[: 2 * n_bytes].to(torch.uint8)  # an odd n keeps the code of the zero padding
    packed = ((codes[0::2] << 4) | codes[1::2]).reshape(n_bytes, 1)
    state = QuantState(
        absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
        quant_type=quant_type, code=table(quant_type, device),
    )
    if double_quant:
        offset = absmax.mean()
        centred = absmax - offset
        blocks2, absmax2 = _blockwise_absmax(centred, NESTED_BLOCKSIZE)
        code2 = dynamic_map(device)
        q = _dquantize(code2, blocks2 * (1.0 / absmax2)[:, None]).reshape(-1)[: absmax.numel()]
        state.absmax = q.to(torch.uint8)
        state.offset = offset
        state.state2 = QuantState(
            absmax=absmax2, shape=centred.shape, dtype=torch.float32, blocksize=NESTED_BLOCKSIZE,
            quant_type="nf4", code=code2,
        )
    return packed, state


def reference_absmax(state) -> torch.Tensor:
    """The float32 per-block absmax of a state, decoding double quantization like bitsandbytes:
    ``float32(code2[q] * absmax2[b // blocksize2])``, then ``+ offset`` as a separate rounding."""
    if getattr(state, "state2", None) is None:
        return state.absmax.float()
    s2 = state.state2
    q = state.absmax.reshape(-1).long()
    group = torch.arange(q.numel(), device=q.device) // int(s2.blocksize)
    absmax = s2.code.reshape(-1)[q] * s2.absmax.reshape(-1)[group]
    return absmax + state.offset


def reference_dequantize(packed: torch.Tensor, state, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantizes in pure PyTorch on the tensors' device (CPU or GPU): the ground truth.

    Same arguments, validation and result as :func:`nf4_explorer.dequantize` (shape and dtype from the
    state), without Triton.
    """
    args = prepare(packed, state, out, for_kernel=False)
    n = args.n
    packed = args.packed.reshape(-1)
    nibbles = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:n].long()
    absmax = reference_absmax(state).reshape(-1).to(args.packed.device)
    scale = absmax[torch.arange(n, device=nibbles.device) // args.blocksize]
    values = table(args.quant_type, nibbles.device)[nibbles] * scale
    args.out.copy_(values.to(args.out.dtype).view(args.out.shape))
    return args.out
