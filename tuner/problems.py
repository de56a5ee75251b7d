"""Problems to tune and benchmark: presets (YAML data), user shapes, and their input tensors."""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
from pathlib import Path

import torch
import yaml

import nf4_explorer
from nf4_explorer.tuning import BLOCKSIZES, DTYPE_NAMES, M_BUCKETS, QUANT_TYPES, size_bucket

DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
DTYPES.update({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32})


@dataclasses.dataclass(frozen=True)
class Problem:
    """One dequantization problem: a weight shape in one format."""

    shape: tuple[int, ...]
    dtype: str = "bfloat16"
    blocksize: int = 64
    double_quant: bool = True
    quant_type: str = "nf4"

    @property
    def n(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def key(self) -> dict:
        """The fields that identify this problem in a tuned file."""
        return {
            "quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant,
            "out_dtype": self.dtype, "size_bucket": size_bucket(self.n), "shape": list(self.shape),
        }

    def label(self) -> str:
        dq = "dq" if self.double_quant else "fp32-absmax"
        return f"{'x'.join(map(str, self.shape))} {self.quant_type} bs{self.blocksize} {dq} {self.dtype}"

    def bytes_moved(self) -> int:
        """Fewest bytes one dequantization must move: packed codes, absmax, output."""
        n_blocks = -(-self.n // self.blocksize)
        absmax = n_blocks * (1 if self.double_quant else 4) + (-(-n_blocks // 256) * 4 + 1024 if self.double_quant else 0)
        return (self.n + 1) // 2 + absmax + self.n * self.torch_dtype.itemsize

    def make_inputs(self, device, seed: int = 0):
        """Random weights quantized to this problem's format: (packed, state) on ``device``."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        weight = torch.randn(self.shape, generator=generator, dtype=torch.float32).to(device, self.torch_dtype)
        return nf4_explorer.quantize(
            weight, blocksize=self.blocksize, double_quant=self.double_quant, quant_type=self.quant_type
        )


@dataclasses.dataclass(frozen=True)
class LinearProblem:
    """One linear problem: x [m, K] times a 4-bit weight [N, K] (``shape``) in one format; ``dtype``
    is x's (and the weight state's) dtype; ``m`` is the M bucket it is tuned for."""

    shape: tuple[int, int]
    m: int
    dtype: str = "bfloat16"
    blocksize: int = 64
    double_quant: bool = True
    quant_type: str = "nf4"
    family = "linear"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def weight_problem(self) -> Problem:
        return Problem(tuple(self.shape), self.dtype, self.blocksize, self.double_quant, self.quant_type)

    def key(self) -> dict:
        return {"family": "linear", **self.weight_problem().key(), "m_bucket": self.m}

    def label(self) -> str:
        return f"M={self.m} {self.weight_problem().label()}"

    def bytes_moved(self) -> int:
        """Fewest bytes: the packed weight and its absmax once, x and the output."""
        n, k = self.shape
        weight = self.weight_problem().bytes_moved() - n * k * self.torch_dtype.itemsize
        return weight + (self.m * k + self.m * n) * self.torch_dtype.itemsize

    def make_inputs(self, device, seed: int = 0):
        """(x, packed, state) on ``device``: random x and a random weight in this format."""
        packed, state = self.weight_problem().make_inputs(device, seed)
        generator = torch.Generator(device="cpu").manual_seed(seed + 1)
        x = torch.randn((self.m, self.shape[1]), generator=generator, dtype=torch.float32).to(device, self.torch_dtype)
        return x, packed, state


def linear_problems(problems: list[Problem], m_buckets=None) -> list[LinearProblem]:
    """The linear problems of 2-D weight problems, at every M bucket (default: all of M_BUCKETS)."""
    buckets = list(m_buckets or M_BUCKETS)
    for m in buckets:
        if m not in M_BUCKETS:
            raise ValueError(f"--m: {m} is not an M bucket: use some of {','.join(map(str, M_BUCKETS))}")
    out = []
    for problem in problems:
        if len(problem.shape) != 2:
            raise ValueError(f"shape {problem.shape}: a linear layer's weight is 2-D, [out_features, in_features]")
        for m in buckets:
            out.append(LinearProblem(tuple(problem.shape), m, problem.dtype, problem.blocksize, problem.double_quant,
                                     problem.quant_type))
    return out


def load_presets(path: str | Path | None = None) -> dict:
    """The presets in ``path`` (a YAML file), or the package's presets.yaml."""
    if path is None:
        text = importlib.resources.files("nf4_explorer.tuner").joinpath("presets.yaml").read_text()
    else:
        text = Path(path).read_text()
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'presets.yaml'}: expected a mapping of preset names to problem sets")
    return data


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """'4096x14336,1024x4096' -> [(4096, 14336), (1024, 4096)]."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            shape = tuple(int(d) for d in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad shape {item!r}: write shapes as ROWSxCOLS, e.g. 4096x14336") from None
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(f"bad shape {item!r}: every dimension must be a positive integer")
        shapes.append(shape)
    return shapes


def _shapes_of(spec: dict) -> list[tuple[int, ...]]:
    shapes = [tuple(s) for s in spec.get("shapes", [])]
    for model_shapes in (spec.get("models") or {}).values():
        shapes += [tuple(s) for s in model_shapes]
    return list(dict.fromkeys(shapes))  # unique, in order


def expand(spec: dict, **overrides) -> list[Problem]:
    """Every problem of a preset spec, with command-line overrides (None = keep the preset's)."""
    spec = {**spec, **{k: v for k, v in overrides.items() if v is not None}}
    shapes = _shapes_of(spec)
    if not shapes:
        raise ValueError("the problem set has no shapes: give --shapes or a preset with shapes")
    for dtype in spec.get("dtypes", ["bfloat16"]):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use bfloat16, float16 or float32")
    for blocksize in spec.get("blocksizes", [64]):
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"unsupported blocksize {blocksize}: use one of {BLOCKSIZES}")
    for quant_type in spec.get("quant_types", ["nf4"]):
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"unsupported quant type {quant_type!r}: use one of {QUANT_TYPES}")
    problems = [
        Problem(shape, DTYPE_NAMES[DTYPES[dtype]], int(bs), bool(dq), qt)
        for shape, dtype, bs, dq, qt in itertools.product(
            shapes, spec.get("dtypes", ["bfloat16"]), spec.get("blocksizes", [64]),
            spec.get("double_quant", [True]), spec.get("quant_types", ["nf4"]),
        )
    ]
    return list(dict.fromkeys(problems))
