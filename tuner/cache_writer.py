"""Writing tuned_configs/<gpu-slug>.json: merge under a file lock, atomic replace."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
import warnings
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


class OutputRefused(ValueError):
    """The tuned file's directory cannot take a write: said before any tuning."""


def lock_path(path: Path) -> Path:
    """The lock of a tuned file: in the temp directory, named by the file's absolute path, so no lock
    file is left in the package or the user's config directory (concurrent tuners on one machine
    share the temp directory)."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]
    directory = Path(tempfile.gettempdir()) / "nf4-explorer-locks"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{digest}.lock"


def check_output(path: Path) -> None:
    """Refuses, before any tuning, an output directory that cannot be created or written."""
    directory = Path(path).parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputRefused(f"cannot create the output directory {directory} ({exc.strerror or exc}): pass "
                            "--output DIR with a directory you can write") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputRefused(f"the output directory {directory} is not writable: pass --output DIR with a directory "
                            "you can write")


def merge(path: Path, new_entries: list[dict], header: dict) -> dict:
    """Adds ``new_entries`` to the file at ``path`` under a file lock and writes it atomically
    (temp file + os.replace), keeping the file's mode (0644 for a new file). Two tuners writing one
    file lose nothing. Nothing is destroyed: a file that cannot be read, parsed or whose schema is
    unknown is renamed aside (``<file>.unreadable-<time>``) with a warning before a new one is
    written, and malformed entries are kept verbatim under "malformed_entries", out of the merge. An entry replaces the one
    with the same problem key unless that one is still valid (current kernels and Triton) and
    faster: merges commute, so workers of one shared study end on its best trials whatever order
    they finish in. An old entry whose winner's kernel has changed since falls back to its fastest
    runner-up whose kernel has not (see :func:`runner_up`). Returns the written document."""
    check_output(path)
    with FileLock(str(lock_path(path)), timeout=600):
        doc, mode = _read_or_set_aside(path)
        old_hashes = doc.get("kernel_hashes", {}) if isinstance(doc.get("kernel_hashes"), dict) else {}
        malformed = list(doc.get("malformed_entries", [])) if isinstance(doc.get("malformed_entries"), list) else []
        by_key = {}
        for e in doc["entries"]:
            problem = tuning.entry_malformed(e)
            if problem is None:
                by_key[tuning.entry_key(e)] = runner_up(e, old_hashes)
            else:
                malformed.append(e)
                warnings.warn(f"nf4-explorer: {path}: an entry is malformed ({problem}); it is kept under "
                              "\"malformed_entries\", out of the merge", RuntimeWarning, stacklevel=2)
        for entry in new_entries:
            key = tuning.entry_key(entry)
            old = by_key.get(key)
            old_time = old.get("time_us") if old is not None else None
            if (old is None or tuning.entry_problem(old) is not None or not isinstance(old_time, (int, float))
                    or entry["time_us"] <= old_time):
                by_key[key] = with_earlier_others(entry, old, old_hashes)
        doc.update(header)
        doc["schema_version"] = tuning.SCHEMA_VERSION
        doc["kernel_hashes"] = {name: tuning.kernel_hash(name) for name in nf4_explorer.names(family=None)}
        doc["entries"] = sorted(by_key.values(), key=_sort_key)
        if malformed:
            doc["malformed_entries"] = malformed
        ordered = {"schema_version": doc.pop("schema_version"), **dict(sorted(doc.items()))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, mode)
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
    others = entry.get("others") if isinstance(entry.get("others"), dict) else {}
    valid = {name: other for name, other in others.items() if _current(name, other, old_hashes.get(name), registered)}
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


def with_earlier_others(entry: dict, old: dict | None, old_hashes: dict) -> dict:
    """``entry`` with what ``old`` (the entry it replaces) measured of variants this run did not: its
    winner and runners-up whose kernels are unchanged since (``old_hashes``: the file's hashes when
    it was written), as runners-up. A tune narrowed to some variants (``--variants``, ``--space``)
    thus keeps the file's knowledge of the others, which ``show`` lists and :func:`runner_up` falls
    back on after a kernel edit."""
    if not isinstance(old, dict):
        return entry
    registered = nf4_explorer.names(family=None)
    measured = {entry["variant"], *entry.get("others", {})}
    earlier = dict(old.get("others")) if isinstance(old.get("others"), dict) else {}
    hashes = {name: old_hashes.get(name) for name in earlier}
    if isinstance(old.get("variant"), str):
        earlier[old["variant"]] = {"config": old.get("config"), "time_us": old.get("time_us")}
        hashes[old["variant"]] = old.get("kernel_hash")
    carried = {name: {"config": other["config"], "time_us": other["time_us"]} for name, other in earlier.items()
               if name not in measured and _current(name, other, hashes[name], registered)}
    if not carried:
        return entry
    return {**entry, "others": dict(sorted({**entry.get("others", {}), **carried}.items()))}


def _current(name: str, result, recorded_hash, registered) -> bool:
    """Whether a recorded result ``{"config", "time_us"}`` of variant ``name`` still stands: the
    variant is registered, its kernel hash is the one recorded with the result, and the result has
    a config and a time."""
    return (name in registered and recorded_hash == tuning.kernel_hash(name) and isinstance(result, dict)
            and isinstance(result.get("config"), dict) and isinstance(result.get("time_us"), (int, float)))


def _sort_key(entry: dict):
    return (tuning.entry_family(entry), entry["quant_type"], entry["blocksize"], not entry["double_quant"],
            entry["out_dtype"], entry["shape"], entry.get("m_bucket") or 0)


def _read_or_set_aside(path: Path) -> tuple[dict, int]:
    """(the current document, the mode to write with). A missing file gives a fresh document and
    0644 less the umask; one that cannot be read, parsed or whose schema is unknown is renamed aside
    first (never replaced unseen)."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return {"entries": []}, 0o644 & ~umask
    except OSError:
        mode = 0o644 & ~umask
    try:
        doc = json.loads(path.read_text())
        problems = tuning.validate_document(doc)
    except (OSError, ValueError, RecursionError) as exc:
        problems = [f"cannot be read ({exc})"]
    if not problems:
        return doc, mode
    aside = path.with_name(f"{path.name}.unreadable-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}")
    os.replace(path, aside)
    warnings.warn(f"nf4-explorer: {path} {'; '.join(problems)}: it was renamed to {aside.name} (nothing in it is "
                  "lost) and a new file is written", RuntimeWarning, stacklevel=3)
    return {"entries": []}, mode


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
