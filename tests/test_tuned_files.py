"""Reliability, tuned-files layer: what the dispatcher does with a file it cannot use (one warning,
exact results through the next tier, never an error per call), and what a tune does with a file it
cannot read (set aside, never replaced unseen; malformed entries kept; mode kept; no lock file left;
killed mid-run, it resumes). One row per case."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import nf4_explorer
from nf4_explorer import _cache
from nf4_explorer.tuner import cache_writer
from nf4_explorer.tuner.problems import Problem
from helpers import assert_bit_equal

TINY = Problem((8, 64), "bfloat16", 64, True, "nf4")
CONFIG = {"BLOCK": 512, "TABLE_IN_REGISTERS": True, "num_warps": 2}


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    directory = tmp_path / "tuned"
    monkeypatch.setenv("NF4_EXPLORER_CONFIG_DIR", str(directory))
    monkeypatch.setattr(_cache, "device_name", lambda device: "Fake GPU 9000")
    return directory


def _entry(problem=TINY, **extra):
    return {**problem.key(), "variant": "where_gather", "config": dict(CONFIG), "time_us": 1.0, "gbps": 1.0,
            "pct_of_copy": 1.0, "others": {}, "driver": "test", "trials": 1, "date": "2026-11-30",
            "triton_version": _cache.triton_minor(), "kernel_hash": _cache.kernel_hash("where_gather"), **extra}


def _dequantize_warns(fragment):
    packed, state = TINY.make_inputs("cuda" if torch.cuda.is_available() else "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert_bit_equal(nf4_explorer.dequantize(packed, state), nf4_explorer.reference_dequantize(packed, state))
    messages = [str(w.message) for w in caught if "nf4-explorer" in str(w.message)]
    assert len(messages) == 1 and fragment in messages[0], messages
    return nf4_explorer.explain(packed, state)


ENTRY_CASES = [
    ("shape 5", dict(shape=5), "shape is 5"),
    ("size_bucket 'nine'", dict(size_bucket="nine"), "size_bucket is 'nine'"),
    ("float BLOCK", dict(config={**CONFIG, "BLOCK": 512.0}), "invalid config"),
    ("double_quant 'off'", dict(double_quant="off"), "double_quant is 'off'"),
    ("blocksize 64.0", dict(blocksize=64.0), "blocksize is 64.0"),
    ("linear without m_bucket", dict(family="linear"), "m_bucket is None"),
]


@pytest.mark.parametrize("change, fragment", [c[1:] for c in ENTRY_CASES], ids=[c[0] for c in ENTRY_CASES])
def test_malformed_entry_is_skipped_with_one_warning(config_dir, change, fragment):
    config_dir.mkdir(parents=True)
    good = _entry(Problem((16, 64)))
    (config_dir / "fake-gpu-9000.json").write_text(json.dumps({"schema_version": 2, "entries": [_entry(**change), good]}))
    choice = _dequantize_warns(fragment)
    assert choice.reason in ("default", "tuned (nearest bucket)")


def test_deeply_nested_file(config_dir):
    config_dir.mkdir(parents=True)
    (config_dir / "fake-gpu-9000.json").write_text("[" * 100000 + "]" * 100000)
    assert _dequantize_warns("nested too deeply").reason == "default"


@pytest.mark.parametrize("kind", ["directory", "dangling symlink", "symlink loop"])
def test_not_a_file_where_the_file_should_be(config_dir, kind):
    config_dir.mkdir(parents=True)
    path = config_dir / "fake-gpu-9000.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "dangling symlink":
        path.symlink_to(config_dir / "nowhere.json")
    else:
        path.symlink_to(path)
    assert _dequantize_warns("is not a regular file" if kind != "symlink loop" else "fake-gpu-9000.json").reason == "default"


def test_config_dir_of_mode_000(config_dir):
    if os.geteuid() == 0:
        pytest.skip("root reads any directory")
    config_dir.mkdir(parents=True)
    (config_dir / "fake-gpu-9000.json").write_text(json.dumps({"schema_version": 2, "entries": [_entry()]}))
    config_dir.chmod(0)
    try:
        assert _dequantize_warns("cannot be looked at").reason == "default"
    finally:
        config_dir.chmod(0o755)


UNREADABLE = [
    ("schema 99", '{"schema_version": 99, "entries": [{"a": 1}]}', "schema_version is 99"),
    ("truncated", '{"schema_version": 2, "entries": [', "cannot be read"),
    ("not json", "garbage", "cannot be read"),
    ("top level a list", "[1, 2]", "top level is not a JSON object"),
]


@pytest.mark.parametrize("content, fragment", [c[1:] for c in UNREADABLE], ids=[c[0] for c in UNREADABLE])
def test_tune_sets_an_unreadable_file_aside(tmp_path, content, fragment):
    path = tmp_path / "fake-gpu-9000.json"
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match=fragment):
        doc = cache_writer.merge(path, [_entry()], {})
    asides = list(tmp_path.glob("fake-gpu-9000.json.unreadable-*"))
    assert len(asides) == 1 and asides[0].read_text() == content, "the unreadable file must be kept as it was"
    assert len(doc["entries"]) == 1


def test_tune_keeps_malformed_entries_and_the_rest(tmp_path):
    path = tmp_path / "fake-gpu-9000.json"
    good = [_entry(Problem((16 * i, 64))) for i in range(1, 6)]
    bad = _entry(shape=5)
    path.write_text(json.dumps({"schema_version": 2, "entries": [bad, *good]}))
    with pytest.warns(RuntimeWarning, match="malformed"):
        doc = cache_writer.merge(path, [_entry()], {})
    assert len(doc["entries"]) == 6 and doc["malformed_entries"] == [bad]
    assert json.loads(path.read_text()) == doc


def test_file_mode_is_kept_and_no_lock_file_is_left(tmp_path):
    path = tmp_path / "fake-gpu-9000.json"
    cache_writer.merge(path, [_entry()], {})
    assert (path.stat().st_mode & 0o777) == 0o644 & ~_umask()
    path.chmod(0o640)
    cache_writer.merge(path, [_entry(Problem((16, 64)))], {})
    assert (path.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-gpu-9000.json"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_killed_tune_leaves_a_valid_file_and_resumes(tmp_path):
    """SIGKILL in the middle of a tune (after its first problem was written), then the same command:
    the file is valid JSON throughout and ends with every problem."""
    out = tmp_path / "out"
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    command = [sys.executable, "-m", "nf4_explorer.tuner", "tune", "--preset", "tiny", "--shapes", "8x64,4x96,16x64",
               "--variants", "where_gather,word_unpack", "--trials", "4", "--storage", storage, "--output", str(out)]
    # The interpreter on the CPU also where there is a GPU (the file is named after the device).
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = out / "triton-interpreter-cpu.json"
    deadline = time.time() + 240
    while time.time() < deadline and worker.poll() is None:
        if path.exists() and json.loads(path.read_text())["entries"]:
            break
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert path.exists(), "the first problem was never written"
    json.loads(path.read_text())
    assert subprocess.run(command, env=env, capture_output=True, timeout=600).returncode == 0
    shapes = sorted(tuple(e["shape"]) for e in json.loads(path.read_text())["entries"])
    assert shapes == [(4, 96), (8, 64), (16, 64)]


def _header_file(directory, slug, name, capability, sm_count):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{slug}.json").write_text(json.dumps({
        "schema_version": 2, "device_name": name, "compute_capability": capability, "sm_count": sm_count,
        "entries": [_entry()]}))


def test_a_gpu_without_a_file_uses_the_nearest_card(config_dir, monkeypatch):
    """Same vendor, then the same architecture family, then compute capability, then SM count;
    the choice says which card's file it came from."""
    _header_file(config_dir, "nvidia-a100", "NVIDIA A100-SXM4-80GB", [8, 0], 108)
    _header_file(config_dir, "nvidia-h200", "NVIDIA H200", [9, 0], 132)
    _header_file(config_dir, "amd-instinct-mi300x", "AMD Instinct MI300X", [9, 4], 304)
    path, card = _cache.nearest_file("NVIDIA H100 NVL", (9, 0), 132)
    assert card == "NVIDIA H200" and path.name == "nvidia-h200.json"
    assert _cache.nearest_file("NVIDIA A10G", (8, 6), 80)[1] == "NVIDIA A100-SXM4-80GB"
    assert _cache.nearest_file("AMD Instinct MI250X", (9, 0), 110)[1] == "AMD Instinct MI300X"
    monkeypatch.setattr(_cache, "device_name", lambda device: "NVIDIA H100 NVL")
    monkeypatch.setattr(_cache, "device_properties", lambda device: ((9, 0), 132))
    packed, state = TINY.make_inputs("cuda" if torch.cuda.is_available() else "cpu")
    choice = nf4_explorer.explain(packed, state)
    assert choice.reason == "tuned (exact)" and "nearest card with a tuned file: NVIDIA H200" in choice.source


def test_config_dir_that_cannot_be_looked_into_simulated(config_dir, monkeypatch):
    """The mode-000 directory case where the tests run as root: stat() raises PermissionError."""
    from pathlib import Path

    config_dir.mkdir(parents=True)
    original = Path.is_file

    def denied(self):
        if self.parent == config_dir:
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "is_file", denied)
    assert _dequantize_warns("cannot be looked at").reason == "default"


def test_tune_sets_aside_a_file_it_may_not_read(tmp_path, monkeypatch):
    """A file owned by another user, 0600 (simulated: reading raises PermissionError): set aside, not replaced."""
    from pathlib import Path

    path = tmp_path / "fake-gpu-9000.json"
    content = json.dumps({"schema_version": 2, "entries": [_entry()]})
    path.write_text(content)
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text",
                        lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self == path else original(self, *a, **k))
    with pytest.warns(RuntimeWarning, match="Permission denied"):
        cache_writer.merge(path, [_entry(Problem((16, 64)))], {})
    monkeypatch.undo()
    (aside,) = tmp_path.glob("fake-gpu-9000.json.unreadable-*")
    assert aside.read_text() == content


def test_read_only_output_refused_simulated(tmp_path, monkeypatch):
    """The read-only --output case where the tests run as root (os.access says no)."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(cache_writer.OutputRefused, match="is not writable"):
        cache_writer.check_output(tmp_path / "out" / "x.json")


def test_a_tuned_entry_that_fails_to_launch_is_dropped_once(config_dir, monkeypatch):
    """An entry that does not compile or launch under this software: one warning, exact results
    through the built-in default, and the choice says why."""
    config_dir.mkdir(parents=True)
    (config_dir / "fake-gpu-9000.json").write_text(json.dumps({"schema_version": 2, "entries": [_entry()]}))
    original = nf4_explorer.Variant.launch

    def broken(self, args, config):
        if self.name == "where_gather":
            raise RuntimeError("compilation failed under this Triton")
        return original(self, args, config)

    monkeypatch.setattr(nf4_explorer.Variant, "launch", broken)
    choice = _dequantize_warns("failed (RuntimeError: compilation failed")
    assert choice.reason == "default" and "tuned where_gather failed here" in choice.detail


def test_show_marks_malformed_entries(config_dir, capsys):
    from nf4_explorer.tuner import cli

    config_dir.mkdir(parents=True)
    (config_dir / "fake-gpu-9000.json").write_text(json.dumps({"schema_version": 2, "entries": [
        _entry(shape=5), _entry(Problem((16, 64)))]}))
    assert cli.main(["show", "--gpu", "fake-gpu-9000"]) == 0
    assert cli.main(["show", "--gpu", "fake-gpu-9000", "--wide"]) == 0
    assert "where_gather" in capsys.readouterr().out
    assert cli.main(["show", "--gpu", "fake-gpu-9000", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    statuses = [row["status"] for row in listed["entries"]]
    assert statuses[0].startswith("ignored: malformed entry (shape is 5") and statuses[1] == "ok"


def test_the_shipped_entries_are_valid_for_this_code():
    """Every entry of the tuned files in the package is usable with this code. A kernel edit that
    marks entries stale costs their card the tuned speed with no error anywhere: re-stamp the
    entries whose compiled kernels did not change (``python scripts/restamp.py``, no GPU needed)
    and re-tune the others on their card."""
    import importlib.resources
    from pathlib import Path

    directory = Path(str(importlib.resources.files("nf4_explorer.tuned_configs")))
    files = sorted(directory.glob("*.json"))
    assert files, f"no tuned files in {directory}"
    registered = set(nf4_explorer.names(family=None))
    for path in files:
        entries = json.loads(path.read_text())["entries"]
        problems = [f"{entry['variant']} {entry.get('family', 'dequantize')} {entry['shape']}: {problem}"
                    for entry in entries if entry["variant"] in registered
                    for problem in [_cache.entry_problem(entry)] if problem is not None]
        assert not problems, (f"{path.name}: {len(problems)} of {len(entries)} entries unusable, e.g. {problems[:3]}: "
                              "python scripts/restamp.py re-stamps those whose kernels compile as before")
