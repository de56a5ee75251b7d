"""The door from tools (the tuner, benchmarks, the CLI) into the runtime.

Everything a tool needs of nf4_explorer's internals is re-exported here, and tools import nothing
else of the runtime but its public API: the runtime's private modules can change behind this door
(a test reads the tuner's imports to keep it so). Importing it does no GPU work and reads no file.
"""

from ._cache import (
    DTYPE_NAMES, SCHEMA_VERSION, device_name, device_properties, entry_family, entry_key, entry_malformed,
    entry_problem, find_file, kernel_hash, load_entries, nearest_file, search_dirs, size_bucket, slug, triton_minor,
    user_config_dir, validate_document,
)
from ._dispatch import dequantize_eager, explain, explain_linear, linear_eager, reset
from ._format import BLOCKSIZES, OUT_DTYPES, QUANT_TYPES, DequantArgs, interpreter_enabled, prepare, problem_constexprs
from ._launch import LAUNCH_PARAMS, KernelArguments, launch_options, launch_parameters
from ._linear import M_BUCKETS, LinearArgs, m_bucket, prepare_linear, reference_linear, tolerance

__all__ = [
    "BLOCKSIZES", "DTYPE_NAMES", "DequantArgs", "KernelArguments", "LAUNCH_PARAMS", "LinearArgs", "M_BUCKETS",
    "OUT_DTYPES", "QUANT_TYPES", "SCHEMA_VERSION", "dequantize_eager", "device_name", "device_properties",
    "entry_family", "entry_key", "entry_malformed", "entry_problem", "explain", "explain_linear", "find_file",
    "interpreter_enabled", "kernel_hash", "launch_options", "launch_parameters", "linear_eager", "load_entries", "m_bucket", "nearest_file",
    "prepare", "prepare_linear", "problem_constexprs", "reference_linear", "reset", "search_dirs", "size_bucket",
    "slug", "tolerance", "triton_minor", "user_config_dir", "validate_document",
]
