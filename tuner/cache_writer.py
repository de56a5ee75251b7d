"""Writing tuned_configs/<gpu-slug>.json: merge under a file lock, atomic replace."""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from pathlib import Path

import torch
import triton
from filelock import FileLock

import nf4_explorer
from nf4_explorer import tuning


def device_info(device: torch.device) -> dict:
    """What the file records about the GPU and the software it was tuned with."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        capability, sm_count = [props.major, props.minor], props.multi_processor_count
    else:
        capability, sm_count = None, None
    return {
        "device_name": tuning.device_name(device),
        "compute_capability": capability,
        "sm_count": sm_count,
        "torch_version": torch.__version__,
        "triton_version": triton.__version__,
    }


def merge(path: Path, new_entries: list[dict], header: dict) -> dict:
    """Adds ``new_entries`` to the file at ``path`` under ``path.lock`` and writes it atomically
    (temp file + os.replace). Two tuners writing one file lose nothing. An entry replaces the one
    with the same problem key unless that one is still valid (current kernels and Triton) and
    faster: merges commute, so workers of one shared study end on its best trials whatever order
    they finish in. An old entry whose winner's kernel has changed since falls back to its fastest
    runner-up whose kernel has not (see :func:`runner_up`). Returns the written document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=600):
        doc = _read_or_empty(path)
        old_hashes = doc.get("kernel_hashes", {})
        by_key = {tuning.entry_key(e): runner_up(e, old_hashes) for e in doc["entries"]
                  if isinstance(e, dict) and _has_key(e)}
        for entry in new_entries:
            key = tuning.entry_key(entry)
            old = by_key.get(key)
            if old is None or tuning.entry_problem(old) is not None or entry["time_us"] <= old.get("time_us", float("inf")):
                by_key[key] = entry
        doc.update(header)
        doc["schema_version"] = tuning.SCHEMA_VERSION
        doc["kernel_hashes"] = {name: tuning.kernel_hash(name) for name in nf4_explorer.names(family=None)}
        doc["entries"] = sorted(by_key.values(), key=_sort_key)
        ordered = {"schema_version": doc.pop("schema_version"), **dict(sorted(doc.items()))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(ordered, f, indent=2, sort_keys=False)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return ordered


def runner_up(entry: dict, old_hashes: dict) -> dict:
    """``entry`` itself, unless its winner's kernel changed since it was tuned: then the same problem
    with the fastest other variant measured in that tuning run whose kernel is unchanged (same
    source hash in ``old_hashes``, the file's hashes when it was written), if there is one. A
    partial re-tune after a kernel edit thus leaves no entry the dispatcher would have to skip."""
    registered = nf4_explorer.names(family=None)
    winner = entry.get("variant")
    if winner not in registered or entry.get("kernel_hash") == tuning.kernel_hash(winner):
        return entry
    valid = {name: other for name, other in entry.get("others", {}).items()
             if name in registered and old_hashes.get(name) == tuning.kernel_hash(name)
             and "config" in other and "time_us" in other}
    if not valid:
        return entry
    name = min(valid, key=lambda n: valid[n]["time_us"])
    best = valid.pop(name)
    # Throughput scales inversely with time; pct_of_copy is None in a file tuned without a GPU.
    old_time = entry.get("time_us")
    rescaled = {field: round(entry[field] * old_time / best["time_us"], 1) for field in ("gbps", "pct_of_copy")
                if isinstance(old_time, (int, float)) and isinstance(entry.get(field), (int, float))}
    return {**entry, **rescaled, "variant": name, "config": best["config"], "time_us": best["time_us"],
            "kernel_hash": tuning.kernel_hash(name), "others": valid}


def _has_key(entry: dict) -> bool:
    fields = ("quant_type", "blocksize", "double_quant", "out_dtype", "shape")
    return all(field in entry for field in fields) and (entry.get("family") != "linear" or "m_bucket" in entry)


def _sort_key(entry: dict):
    return (entry.get("family", "dequantize"), entry["quant_type"], entry["blocksize"], not entry["double_quant"],
            entry["out_dtype"], entry["shape"], entry.get("m_bucket") or 0)


def _read_or_empty(path: Path) -> dict:
    """The current document, or a fresh one if the file is missing or unusable (a corrupt or
    other-schema file is replaced, not merged)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"entries": []}
    if tuning.validate_document(doc):
        return {"entries": []}
    return doc


def make_entry(problem, winner: dict, others: dict, *, driver: str, trials: int, copy_gbps: float | None) -> dict:
    """One file entry: the problem key, the winning variant/config and its numbers, every other
    variant's best, the driver and trials spent."""
    gbps = problem.bytes_moved() / (winner["time_us"] * 1e-6) / 1e9
    return {
        **problem.key(),
        "variant": winner["variant"],
        "config": winner["config"],
        "time_us": round(winner["time_us"], 3),
        "gbps": round(gbps, 1),
        "pct_of_copy": round(100 * gbps / copy_gbps, 1) if copy_gbps else None,
        "others": {
            name: {"config": best["config"], "time_us": round(best["time_us"], 3)}
            for name, best in sorted(others.items()) if name != winner["variant"]
        },
        "driver": driver,
        "trials": trials,
        "date": datetime.date.today().isoformat(),
        "triton_version": tuning.triton_minor(),
        "kernel_hash": tuning.kernel_hash(winner["variant"]),
    }
