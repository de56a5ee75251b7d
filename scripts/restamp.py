"""Re-stamps the tuned entries that a code change marked stale although their compiled kernels did not change.

    python scripts/restamp.py [--base REV] [--dry-run] [--root DIR] [FILE ...]

A tuned entry is valid while its variant's kernel hash (the code that shapes the kernel:
``nf4_explorer._cache.kernel_hash``) is the one recorded with it. An edit of that code that leaves
the compiled kernel as it was (a refactor, a check in the variant's module) still marks the entries
stale, and CI's ``test_the_shipped_entries_are_valid_for_this_code`` fails. This script settles it
without a GPU: for each variant whose hash moved between REV (default HEAD) and the working tree,
it compiles every kernel that the file's entries name for it (winners and runners-up, each format,
with and without a bias, a float16 x on a bfloat16 weight too) ahead of time for the file's compute
capability, once with REV's code and once with the working tree's. Where every PTX is the same
(debug lines aside) and, for a variant with a launch of its own (split-K sums, dequantize +
cuBLAS), the code of that launch is too, the variant's entries that were valid at REV and the
file's hash of it are re-stamped; otherwise nothing of it is, and the script says what differs:
re-tune that variant on its card.

FILE: the tuned files (default: DIR/tuned_configs/*.json, DIR the checkout, this script's by
default). Needs git and a Triton that compiles for the files' targets (any install, CPU-only
included; the script runs its compiles outside TRITON_INTERPRET). Exit status 1 when a variant
was left stale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The distribution's layout (pyproject.toml's package-dir): where each folder lands in the package.
LAYOUT = {"variants": "nf4_explorer", "tuner": "nf4_explorer/tuner", "tuned_configs": "nf4_explorer/tuned_configs"}


def _package(source: Path, target: Path) -> Path:
    """The package tree built from a checkout's folders ``source``, under ``target``."""
    for folder, place in LAYOUT.items():
        shutil.copytree(source / folder, target / place, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _worker(package: str, jobs_path: str | None, out_path: str, root: str) -> None:
    """In a process of its own: without ``jobs_path``, the kernel hashes of ``package``'s variants and
    the code digests of their own launches; with it, the PTX digest of each job (compiled by the
    working tree's ``tuner/aot.py`` from ``package``'s code)."""
    sys.path.insert(0, package)
    import nf4_explorer
    from nf4_explorer import tuning

    assert nf4_explorer.__file__.startswith(package), f"imported {nf4_explorer.__file__}, not the tree in {package}"
    # The working tree's tools on either side's package (REV's may lack their options).
    cache, aot = _load(Path(root) / "variants" / "_cache.py"), _load(Path(root) / "tuner" / "aot.py")
    result = {"hashes": {}, "run": {}, "ptx": {}}
    for name in [] if jobs_path else nf4_explorer.names(family=None):  # the first pass's facts
        result["hashes"][name] = tuning.kernel_hash(name)
        run = nf4_explorer.get(name).run
        if run is not None:  # a variant that launches more than its kernel: the code of that launch
            module = sys.modules[run.__module__]
            code = cache.used_code(module, [], names={run.__name__}) + "".join(
                cache.used_code(sibling, [module]) for sibling in cache._variant_imports(module))
            result["run"][name] = hashlib.sha256(code.encode()).hexdigest()
    if jobs_path:
        from triton.backends.compiler import GPUTarget

        for key in json.loads(Path(jobs_path).read_text()):
            job = json.loads(key)
            if nf4_explorer.get(job["variant"]).kernel is None:  # its run is all it launches (above)
                result["ptx"][key] = "no kernel"
                continue
            try:
                compiled = aot.compile_config(job["variant"], job["config"], GPUTarget("cuda", job["capability"], 32),
                                          out_dtype=job["out_dtype"], double_quant=job["double_quant"],
                                          blocksize=job["blocksize"], quant_type=job["quant_type"],
                                          weight_dtype=job["weight_dtype"], bias=job["bias"])
                ptx = compiled.asm["ptx"]
            except Exception as exc:  # a tuned kernel that does not compile here: nothing is shown unchanged
                result["ptx"][key] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                continue
            lines = ptx.split(".section\t.debug")[0].split(".section .debug")[0].splitlines()
            kept = [line for line in lines
                    if not line.strip().startswith((".loc", ".file", "$L__tmp")) and "debug" not in line]
            result["ptx"][key] = hashlib.sha256("\n".join(kept).encode()).hexdigest()
    Path(out_path).write_text(json.dumps(result))


def _load(path: Path):
    """The module in file ``path``, loaded on its own (absolute imports resolve to the worker's package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_restamp_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_worker(package: Path, jobs: list[str] | None, scratch: Path, label: str, root: Path) -> dict:
    jobs_path = None
    if jobs is not None:
        jobs_path = scratch / f"{label}-jobs.json"
        jobs_path.write_text(json.dumps(jobs))
    out = scratch / f"{label}-out.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, __file__, "--worker", str(package), str(jobs_path or ""), str(out), str(root)],
                   check=True, env=env)
    return json.loads(out.read_text())


def _jobs(entry: dict, variant: str, capability: int) -> list[str]:
    """The kernels ``entry`` names for ``variant`` (its winner, its runners-up), as job keys."""
    configs = [entry["config"]] if entry["variant"] == variant else []
    other = (entry.get("others") or {}).get(variant)
    if isinstance(other, dict) and isinstance(other.get("config"), dict):
        configs.append(other["config"])
    linear = entry.get("family") == "linear"
    keys = []
    for config in configs:
        weights = [entry["out_dtype"]] + (["bfloat16"] if linear and entry["out_dtype"] == "float16" else [])
        for weight_dtype in weights:
            for bias in ((True, False) if linear else (False,)):
                keys.append(json.dumps({"variant": variant, "config": config, "capability": capability,
                                        "out_dtype": entry["out_dtype"], "double_quant": entry["double_quant"],
                                        "blocksize": entry["blocksize"], "quant_type": entry["quant_type"],
                                        "weight_dtype": weight_dtype if linear else None, "bias": bias},
                                       sort_keys=True))
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="tuned files (default: tuned_configs/*.json)")
    parser.add_argument("--base", default="HEAD", help="the revision at which the entries were valid (default HEAD)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be re-stamped, write nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout (default: this script's)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    files = args.files or sorted((root / "tuned_configs").glob("*.json"))

    with tempfile.TemporaryDirectory(prefix="nf4-restamp-") as tmp:
        scratch = Path(tmp)
        source = scratch / "base-src"
        source.mkdir()
        archive = subprocess.run(["git", "-C", str(root), "archive", args.base, *LAYOUT], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        base, head = _package(source, scratch / "base"), _package(root, scratch / "head")
        base_facts = _run_worker(base, None, scratch, "base-hashes", root)
        head_facts = _run_worker(head, None, scratch, "head-hashes", root)
        base_hashes, head_hashes = base_facts["hashes"], head_facts["hashes"]
        moved = {name for name in head_hashes if name in base_hashes and base_hashes[name] != head_hashes[name]}

        plans, jobs = [], set()
        for path in files:
            doc = json.loads(path.read_text())
            capability = 10 * doc["compute_capability"][0] + doc["compute_capability"][1]
            for variant in sorted(moved):
                valid = [e for e in doc["entries"] if e.get("variant") == variant
                         and e.get("kernel_hash") == base_hashes[variant]]
                named = [key for e in doc["entries"] for key in _jobs(e, variant, capability)]
                if valid or doc.get("kernel_hashes", {}).get(variant) == base_hashes[variant]:
                    plans.append((path, variant, valid, named))
                    jobs.update(named)
        if not plans:
            print(f"no tuned entry valid at {args.base} has gone stale: nothing to re-stamp")
            return 0
        print(f"compiling {len(jobs)} kernels twice ({args.base} and the working tree), no GPU needed")
        before = _run_worker(base, sorted(jobs), scratch, "base", root)["ptx"]
        after = _run_worker(head, sorted(jobs), scratch, "head", root)["ptx"]

    left_stale = False
    for path in files:
        doc = json.loads(path.read_text())
        changed = False
        for plan_path, variant, valid, named in plans:
            if plan_path != path:
                continue
            named = sorted(set(named))
            # A kernel that fails the same way with both codes is no change (a float16 x on a bfloat16
            # weight where the variant declines that pair); none compiling at all says nothing.
            failed = [key for key in named if after[key].startswith("error")]
            compiled = [key for key in named if not after[key].startswith("error")]
            differ = [json.loads(key) for key in named if before[key] != after[key]]
            run_moved = base_facts["run"].get(variant) != head_facts["run"].get(variant)
            if (failed and not compiled) or differ or run_moved:
                left_stale = True
                if failed and not compiled:
                    why = f"none of its {len(named)} kernels compiles here ({after[failed[0]][:200]})"
                elif differ:
                    why = (f"{len(differ)} of {len(named)} kernels compile differently (e.g. config "
                           f"{differ[0]['config']}, {differ[0]['out_dtype']}): re-tune it on its card")
                else:
                    why = "the code of its own launch (its run, what it calls) changed: re-tune it on its card"
                print(f"{path.name}: {variant}: left stale: {why}")
                continue
            for entry in doc["entries"]:
                if entry.get("variant") == variant and entry.get("kernel_hash") == base_hashes[variant]:
                    entry["kernel_hash"] = head_hashes[variant]
            if doc.get("kernel_hashes", {}).get(variant) == base_hashes[variant]:  # its runners-up: valid again
                doc["kernel_hashes"][variant] = head_hashes[variant]
            changed = True
            print(f"{path.name}: {variant}: {len(valid)} entries re-stamped ({len(compiled)} kernels, the same PTX"
                  + (f"; {len(failed)} more fail alike with both codes" if failed else "") + ")")
        if changed and not args.dry_run:
            path.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if left_stale else 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3] or None, sys.argv[4], sys.argv[5])
    else:
        sys.exit(main())
