"""Reading tuned_configs/<gpu-slug>.json: where the files are, their schema, staleness.

The writer lives in ``tuner/`` (the runtime never imports the tuner); both share the names here.

File layout (``schema_version`` 2; files of version 1, dequantize entries only, are read as they are)::

    {"schema_version": 1, "device_name": ..., "compute_capability": [9, 0], "sm_count": 132,
     "copy_bandwidth_gbps": 3019.0, "torch_version": ..., "triton_version": ...,
     "kernel_hashes": {"per_row": "1f2e...", ...},
     "entries": [{"quant_type": "nf4", "blocksize": 64, "double_quant": true,
                  "out_dtype": "bfloat16", "size_bucket": 24, "shape": [4096, 4096],
                  "variant": "block_tile", "config": {...}, "time_us": 9.1, "gbps": 2810.0,
                  "pct_of_copy": 93.1, "others": {"per_row": {"config": {...}, "time_us": 12.0}},
                  "driver": "optuna", "trials": 40, "date": "2026-11-27",
                  "triton_version": "3.6", "kernel_hash": "1f2e..."},
                 {"family": "linear", "m_bucket": 16, "shape": [14336, 4096], ... (the same fields;
                  out_dtype is x's dtype, shape the weight's [N, K])}]}

An entry without "family" is a dequantize entry.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import inspect
import io
import json
import os
import re
import textwrap
import tokenize
import warnings
from pathlib import Path
from typing import Any

import torch
import triton

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
ENV_CONFIG_DIR = "NF4_EXPLORER_CONFIG_DIR"
ENTRY_FIELDS = ("quant_type", "blocksize", "double_quant", "out_dtype", "size_bucket", "shape", "variant", "config")
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def slug(device_name: str) -> str:
    """File-name slug of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown-device"


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or 'Triton interpreter (CPU)' for CPU tensors."""
    if device.type == "cpu":
        return "Triton interpreter (CPU)"
    return torch.cuda.get_device_name(device)


def triton_minor() -> str:
    """Triton's major.minor: tuned entries from another major.minor are stale."""
    return ".".join(triton.__version__.split(".")[:2])


def size_bucket(n: int) -> int:
    """Power-of-two size class of an element count (n in [2^(b-1), 2^b) -> b)."""
    return int(n).bit_length()


def user_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nf4-explorer"


def search_dirs() -> list[tuple[str, Path]]:
    """Where tuned files are looked for, first match wins: $NF4_EXPLORER_CONFIG_DIR if set, else
    the user's config directory, then the files shipped in the package (tuned_configs/)."""
    env = os.environ.get(ENV_CONFIG_DIR)
    if env:
        return [(f"${ENV_CONFIG_DIR}", Path(env))]
    dirs = [("user config dir", user_config_dir())]
    try:
        dirs.append(("shipped", Path(str(importlib.resources.files("nf4_explorer.tuned_configs")))))
    except (ModuleNotFoundError, TypeError):
        pass
    return dirs


def find_file(name: str) -> Path | None:
    """The tuned file for device ``name``, from the first directory of :func:`search_dirs` that has
    one. Something else where the file should be (a directory, a dangling or looping symlink, a
    directory it may not look into) is passed over with one warning."""
    for _, directory in search_dirs():
        path = directory / f"{slug(name)}.json"
        try:
            if path.is_file():
                return path
            if path.is_symlink() or path.exists():
                _warn(path, "is not a regular file (a directory, or a dangling or looping symlink): it is not read")
        except OSError as exc:  # a directory of mode 000, a symlink loop
            _warn(path, f"cannot be looked at ({exc.strerror or exc})")
    return None


@functools.lru_cache(maxsize=None)
def kernel_hash(variant_name: str) -> str:
    """sha256 (16 hex digits) of everything that shapes a variant's compiled kernel: its whole
    module (kernel, helpers, grid, space), what it takes from the variant modules it imports helpers
    from and from the shared device code ``_decode`` (the definitions imported, and what they use in
    turn: :func:`used_code`), the compile options, the family's argument builder (what the kernel
    is called with) and the space, their code only (:func:`code_only`). An edit of that code marks
    its tuned entries stale; an edit of comments or docstrings, of code elsewhere in those modules
    (another variant's checks), of validation, dispatch or file handling does not."""
    import sys

    from . import _decode, _format, _launch, _linear, _registry

    variant = _registry.get(variant_name)
    function = variant.kernel if variant.kernel is not None else variant.run
    module = sys.modules[getattr(function, "fn", function).__module__]
    if variant.family == "linear":
        builders = (_linear.LinearArgs.kernel_arguments, _linear.runtime_arguments, _format.device_pair_table,
                    _format.problem_constexprs)
    else:
        builders = (_format.DequantArgs.kernel_arguments, _format.device_table, _format.problem_constexprs)
    siblings = _variant_imports(module)
    modules = (module, *siblings)
    parts = [code_only(inspect.getsource(module)), *(used_code(sibling, modules) for sibling in siblings),
             used_code(_decode, modules),
             *(code_only(inspect.getsource(builder)) for builder in (_launch.launch_options, *builders)),
             repr(sorted(variant.space.items()))]
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


_SIBLING_IMPORT = re.compile(r"^from \.([a-z]\w*) import", re.MULTILINE)


def _variant_imports(module) -> list:
    """The other variant modules whose code ``module`` runs (``from .linear_lut_gemm import
    split_k_run``), and theirs in turn, by name: a kernel built from a sibling's helpers goes stale
    with them."""
    import sys

    package = module.__name__.rpartition(".")[0]
    found, todo = {}, [module]
    while todo:
        for name in _SIBLING_IMPORT.findall(inspect.getsource(todo.pop())):
            if name not in found and name != module.__name__.rpartition(".")[2]:
                found[name] = sys.modules[f"{package}.{name}"]
                todo.append(found[name])
    return [found[name] for name in sorted(found)]


def used_code(shared, modules, names=()) -> str:
    """The code (:func:`code_only`) of the top-level statements of module ``shared`` that ``modules``
    take from it (``from ._decode import lut_values``) or that define ``names``, with every statement
    of ``shared`` that those use in turn, in file order. A statement that defines nothing counts when
    it changes an object that counts (``table.append(...)``, ``table[k] = v``), not when it only
    passes one along (``register(Variant(grid=_grid, ...))``); the values of plain-data names
    ``shared`` imports itself (``NF4_TABLE``) count too. A module that reaches ``shared`` otherwise
    (``from . import _decode``) counts the whole of it. (A hash only says when a tuned entry is
    stale; what runs is always the current code.)"""
    import ast

    source = inspect.getsource(shared)
    wanted, short = set(names), shared.__name__.rpartition(".")[2]
    for module in modules:
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == short:
                wanted.update(alias.name for alias in node.names)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                    short in (alias.name, alias.asname) or alias.name.endswith(f".{short}") for alias in node.names):
                return code_only(source)
    statements = [statement for statement in ast.parse(source).body  # less the module's docstring
                  if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant))]
    defines = [_defined_names(statement) for statement in statements]
    uses = [{node.id for node in ast.walk(statement) if isinstance(node, ast.Name)} for statement in statements]
    module_names = set().union(*defines)
    changes = [{node.value.id for node in ast.walk(statement) if isinstance(node, (ast.Attribute, ast.Subscript))
                and isinstance(node.value, ast.Name) and node.value.id in module_names}  # x.append(...), x[k] = v
               for statement in statements]
    kept, kept_names, todo = set(), set(), set(wanted)
    while todo:
        name = todo.pop()
        kept_names.add(name)
        for i, statement in enumerate(statements):
            if i not in kept and (name in defines[i] or (not defines[i] and name in changes[i])):
                kept.add(i)
                todo |= uses[i] - kept_names
    lines = source.splitlines(keepends=True)
    parts = []
    for i in sorted(kept):
        statement = statements[i]
        first = min([statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])])
        parts.append(code_only("".join(lines[first - 1:statement.end_lineno])))
        if isinstance(statement, ast.ImportFrom):
            parts += [f"{name} = {getattr(shared, name)!r}" for name in sorted(defines[i] & kept_names)
                      if isinstance(getattr(shared, name, None), (int, float, str, tuple, dict))]
    return "\n".join(parts)


def _defined_names(statement) -> set[str]:
    """The module-level names a top-level statement binds (a def or class its name; an import, an
    assignment, or a try/if block of them, every name bound in it)."""
    import ast

    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    names = set()
    for node in ast.walk(statement):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).partition(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


_STATEMENT_START = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)


@functools.lru_cache(maxsize=64)
def code_only(source: str) -> str:
    """``source`` without its comments, docstrings, blank lines and trailing spaces, so that an edit
    of the prose leaves the kernel hash (and the tuned entries) alone. tokenize finds the comments
    and the docstrings (a string that is a whole statement); they are cut from the text itself, so
    the result does not depend on the Python version's tokens (3.12 splits f-strings)."""
    text = textwrap.dedent(source)
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type != tokenize.NL]
    except (tokenize.TokenError, SyntaxError):  # what tokenize refuses is hashed as it is
        return source
    cuts, previous = [], tokenize.NEWLINE
    for i, token in enumerate(tokens):
        if token.type == tokenize.COMMENT:
            cuts.append(token)
            continue
        if token.type == tokenize.STRING and previous in _STATEMENT_START:
            after = next((t.type for t in tokens[i + 1:] if t.type != tokenize.COMMENT), tokenize.ENDMARKER)
            if after in (tokenize.NEWLINE, tokenize.ENDMARKER):
                cuts.append(token)
        previous = token.type
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    kept, at = [], 0
    for token in cuts:
        begin = starts[token.start[0] - 1] + token.start[1]
        kept.append(text[at:begin])
        at = starts[token.end[0] - 1] + token.end[1]
    kept.append(text[at:])
    return "\n".join(line.rstrip() for line in "".join(kept).splitlines() if line.strip())


def entry_family(entry: dict) -> str:
    return entry.get("family", "dequantize")


def entry_key(entry: dict) -> tuple:
    """The identity of an entry: two entries with one key are the same tuned problem."""
    return (entry_family(entry), entry["quant_type"], entry["blocksize"], entry["double_quant"], entry["out_dtype"],
            tuple(entry["shape"]), entry.get("m_bucket"))


def validate_document(doc: Any) -> list[str]:
    """Problems with the file as a whole (empty list when it is usable)."""
    if not isinstance(doc, dict):
        return ["top level is not a JSON object"]
    problems = []
    if doc.get("schema_version") not in READABLE_SCHEMAS:
        problems.append(f"schema_version is {doc.get('schema_version')!r}, this nf4-explorer reads {READABLE_SCHEMAS}")
    if not isinstance(doc.get("entries"), list):
        problems.append("no 'entries' list")
    return problems


def entry_malformed(entry: Any) -> str | None:
    """What is wrong with an entry's fields and their types (None when they are well formed)."""
    from ._format import BLOCKSIZES, QUANT_TYPES, _is_int

    if not isinstance(entry, dict):
        return "not an object"
    missing = [f for f in ENTRY_FIELDS if f not in entry]
    if missing:
        return f"no {', '.join(missing)}"
    checks = (
        ("quant_type", entry["quant_type"] in QUANT_TYPES, f"one of {QUANT_TYPES}"),
        ("blocksize", _is_int(entry["blocksize"]) and entry["blocksize"] in BLOCKSIZES, f"one of {BLOCKSIZES}"),
        ("double_quant", isinstance(entry["double_quant"], bool), "true or false"),
        ("out_dtype", entry["out_dtype"] in DTYPE_NAMES.values(), f"one of {sorted(DTYPE_NAMES.values())}"),
        ("size_bucket", _is_int(entry["size_bucket"]) and entry["size_bucket"] >= 0, "a non-negative integer"),
        ("shape", isinstance(entry["shape"], list) and all(_is_int(d) and d > 0 for d in entry["shape"]),
         "a list of positive integers"),
        ("variant", isinstance(entry["variant"], str), "a variant's name"),
        ("config", isinstance(entry["config"], dict), "an object of parameters"),
        ("family", entry_family(entry) in ("dequantize", "linear"), "dequantize or linear"),
    )
    for field, ok, expected in checks:
        if not ok:
            return f"{field} is {entry[field]!r}, expected {expected}"
    if entry_family(entry) == "linear":
        if not (_is_int(entry.get("m_bucket")) and entry["m_bucket"] > 0):
            return f"m_bucket is {entry.get('m_bucket')!r}, expected a positive integer"
        if len(entry["shape"]) != 2:
            return f"shape is {entry['shape']!r}, expected [N, K]"
    return None


def entry_problem(entry: Any) -> str | None:
    """Why one entry cannot be used (None when it can): malformed, stale Triton, or stale kernel."""
    from . import _registry

    malformed = entry_malformed(entry)
    if malformed is not None:
        return f"malformed entry ({malformed})"
    if entry["variant"] not in _registry.names(family=entry_family(entry)):
        return f"unknown variant {entry['variant']!r}"
    # An entry tuned with another Triton keeps serving while its kernel is unchanged (the choice says
    # "tuned with Triton X"): a winner rarely changes with the compiler, the built-in default is
    # slower (1.03x at the median, 1.14x at worst over five shapes on an H200), and an entry that
    # fails to compile or launch under this Triton is dropped at its first call (_dispatch).
    if entry.get("kernel_hash") != kernel_hash(entry["variant"]):
        return f"kernel {entry['variant']} changed since it was tuned"
    try:
        _registry.get(entry["variant"]).check_config(entry["config"], entry["blocksize"])
    except (ValueError, TypeError) as exc:
        return f"invalid config: {exc}"
    return None


def device_properties(device: torch.device) -> tuple[tuple[int, int], int] | None:
    """(compute capability, SM count) of a GPU, or None for the interpreter."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor), props.multi_processor_count


def nearest_file(name: str, capability: tuple[int, int], sm_count: int) -> tuple[Path, str] | None:
    """For a GPU with no tuned file of its own: the file of the nearest card that has one (same
    vendor first, then the same architecture family (compute capability major), then the nearest
    compute capability, then the nearest SM count), as (path, that card's name); None if no file
    says what card it was tuned on. A tuned config of another card is valid here (the kernels are
    the same); it is only tuned for a neighbour."""
    vendor = name.split()[0].lower() if name.split() else ""
    best, seen = None, set()
    for _, directory in search_dirs():
        try:
            paths = sorted(directory.glob("*.json")) if directory.is_dir() else []
        except OSError:
            continue
        for path in paths:
            if path.stem in seen:
                continue
            seen.add(path.stem)
            try:
                doc = json.loads(path.read_text())
                cc, sms, card = doc["compute_capability"], doc["sm_count"], str(doc["device_name"])
                rank = (card.split()[0].lower() != vendor, cc[0] != capability[0],
                        abs((cc[0] * 10 + cc[1]) - (capability[0] * 10 + capability[1])), abs(int(sms) - sm_count))
            except (OSError, ValueError, RecursionError, KeyError, TypeError, IndexError, AttributeError):
                continue  # not a tuned file of a GPU (or unreadable): not a candidate
            if not validate_document(doc) and (best is None or rank < best[0]):
                best = (rank, path, card)
    return (best[1], best[2]) if best else None


def load_entries(name: str, device: torch.device | None = None) -> tuple[str, list[dict]]:
    """(where the entries come from, usable entries) of the tuned file for device ``name``: its own
    file, else (for a GPU ``device``) the nearest card's file, said in the source. Never raises: no
    file gives no entries silently; an unreadable, corrupt or stale one gives one warning naming the
    file and why."""
    path, source = find_file(name), None
    if path is None and device is not None:
        properties = device_properties(device)
        nearest = nearest_file(name, *properties) if properties else None
        if nearest is not None:
            path, card = nearest
            source = f"{path} (nearest card with a tuned file: {card})"
    if path is None:
        return "", []
    source = source or str(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _warn(path, f"cannot be read ({exc})")
        return source, []
    except RecursionError:
        _warn(path, "cannot be read (nested too deeply to be a tuned file)")
        return source, []
    problems = validate_document(doc)
    if problems:
        _warn(path, "; ".join(problems))
        return source, []
    usable, skipped = [], {}
    for entry in doc["entries"]:
        problem = entry_problem(entry)
        if problem is None:
            usable.append(entry)
        else:
            skipped[problem] = skipped.get(problem, 0) + 1
    if skipped:
        causes = "; ".join(f"{count} entries: {problem}" for problem, count in skipped.items())
        _warn(path, f"has stale or invalid entries that are ignored ({causes}); re-run `nf4-explorer tune`")
    return source, usable


def _warn(path: Path, message: str) -> None:
    warnings.warn(
        f"nf4-explorer: tuned config file {path} {message}. Falling back to built-in defaults where needed.",
        RuntimeWarning,
        stacklevel=4,
    )
