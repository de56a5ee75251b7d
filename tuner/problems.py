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


PRESET_KEYS = ("shapes", "models", "dtypes", "blocksizes", "double_quant", "quant_types")


def load_presets(path: str | Path | None = None) -> dict:
    """The presets in ``path`` (a YAML file), or the package's presets.yaml. Raises ValueError with
    one line naming the file and the problem (missing, a directory, not YAML, not a mapping of
    presets); each preset's fields are checked by :func:`expand`."""
    if path is None:
        text, where = importlib.resources.files("nf4_explorer.tuner").joinpath("presets.yaml").read_text(), "presets.yaml"
    else:
        where = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ValueError(f"--shapes-file {where}: no such file") from None
        except IsADirectoryError:
            raise ValueError(f"--shapes-file {where} is a directory: pass a YAML file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--shapes-file {where} cannot be read ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: expected a mapping of preset names to problem sets (see tuner/presets.yaml), "
                         f"got {type(data).__name__ if data is not None else 'an empty file'}")
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: preset {name!r} must be a mapping with {', '.join(PRESET_KEYS)}")
        unknown = sorted(set(spec) - set(PRESET_KEYS))
        if unknown:
            raise ValueError(f"{where}: preset {name!r} has unknown keys {unknown}: use {', '.join(PRESET_KEYS)}")
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(d) and d > 0 for d in value):
        raise ValueError(f"{where}: bad shape {value!r}: write [ROWS, COLS] with positive integers, e.g. [4096, 14336]")
    return tuple(value)


def _list_of(spec: dict, key: str, default: list, valid, expected: str) -> list:
    values = spec.get(key, default)
    if not isinstance(values, list) or not values:
        raise ValueError(f"{key} must be a non-empty list, got {values!r}: e.g. {key}: {default}".replace("True", "true"))
    for value in values:
        if not valid(value):
            raise ValueError(f"{key}: {value!r} is not {expected}")
    return values


def _shapes_of(spec: dict) -> list[tuple[int, ...]]:
    shapes = spec.get("shapes", [])
    if not isinstance(shapes, list):
        raise ValueError(f"shapes must be a list of [ROWS, COLS], got {shapes!r}")
    result = [_shape(s, "shapes") for s in shapes]
    models = spec.get("models") or {}
    if not isinstance(models, dict):
        raise ValueError(f"models must map model names to lists of shapes, got {models!r}")
    for model, model_shapes in models.items():
        if not isinstance(model_shapes, list):
            raise ValueError(f"models.{model} must be a list of [ROWS, COLS], got {model_shapes!r}")
        result += [_shape(s, f"models.{model}") for s in model_shapes]
    return list(dict.fromkeys(result))  # unique, in order


def expand(spec: dict, **overrides) -> list[Problem]:
    """Every problem of a preset spec, with command-line overrides (None = keep the preset's). Raises
    ValueError naming the field, the value and what it must be (YAML's "off" is a string, not false)."""
    spec = {**spec, **{k: v for k, v in overrides.items() if v is not None}}
    shapes = _shapes_of(spec)
    if not shapes:
        raise ValueError("the problem set has no shapes: give --shapes or a preset with shapes")
    dtypes = _list_of(spec, "dtypes", ["bfloat16"], lambda v: isinstance(v, str) and v in DTYPES,
                      "bfloat16 or float16 or float32")
    blocksizes = _list_of(spec, "blocksizes", [64], lambda v: _is_int(v) and v in BLOCKSIZES,
                          f"one of {', '.join(map(str, BLOCKSIZES))}")
    double_quant = _list_of(spec, "double_quant", [True], lambda v: isinstance(v, bool), "true or false")
    quant_types = _list_of(spec, "quant_types", ["nf4"], lambda v: v in QUANT_TYPES, "nf4 or fp4")
    problems = [
        Problem(shape, DTYPE_NAMES[DTYPES[dtype]], int(bs), bool(dq), qt)
        for shape, dtype, bs, dq, qt in itertools.product(shapes, dtypes, blocksizes, double_quant, quant_types)
    ]
    return list(dict.fromkeys(problems))
