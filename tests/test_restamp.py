"""scripts/restamp.py on a throwaway checkout (no GPU: kernels compiled ahead of time for sm_90): an
edit that leaves a variant's compiled kernels as they were re-stamps its entries; an edit of the
kernel leaves them stale and exits with 1."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _restamp(repo):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(repo / "scripts" / "restamp.py"), "--root", str(repo)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_restamp_keeps_entries_of_an_unchanged_kernel_only(tmp_path):
    repo = tmp_path / "repo"
    for folder in ("variants", "tuner", "scripts"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shipped = json.loads((ROOT / "tuned_configs" / "nvidia-h200.json").read_text())
    entries = [e for e in shipped["entries"] if e["variant"] == "block_tile"][:2]
    assert entries, "the shipped H200 file has no block_tile entry to test with"
    doc = {**shipped, "entries": entries, "kernel_hashes": {"block_tile": entries[0]["kernel_hash"]}}
    (repo / "tuned_configs").mkdir()
    shutil.copy(ROOT / "tuned_configs" / "__init__.py", repo / "tuned_configs")
    path = repo / "tuned_configs" / "card.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "base")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tuned")
    module = repo / "variants" / "block_tile.py"

    # Not the kernel: the description in the registration (part of the hash, not of the PTX).
    module.write_text(module.read_text().replace('description="ROWS x BYTES', 'description="ROWS by BYTES'))
    done = _restamp(repo)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"block_tile: {len(entries)} entries re-stamped" in done.stdout, done.stdout
    stamped = json.loads(path.read_text())
    new_hash = stamped["kernel_hashes"]["block_tile"]
    assert new_hash != entries[0]["kernel_hash"] and all(e["kernel_hash"] == new_hash for e in stamped["entries"])

    # The kernel itself: its entries stay stale, the file as it was.
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "re-stamped")
    module.write_text(module.read_text().replace("mask=byte_mask, other=0)", "mask=byte_mask, other=1)"))
    before = path.read_text()
    left = _restamp(repo)
    assert left.returncode == 1 and "block_tile: left stale" in left.stdout, left.stdout + left.stderr
    assert path.read_text() == before
