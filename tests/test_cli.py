"""The command line's errors, one test row per class: every user mistake is one line naming the
problem and the fix, exit code 2 (usage), no traceback; failures exit 1; --version works.
(tuner layer of the reliability issue; the runtime's inputs are in test_errors.py.)"""

import importlib.util
import os
import stat
import subprocess
import sys

import pytest

from nf4_explorer.tuner import cli


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NF4_EXPLORER_CONFIG_DIR", str(tmp_path / "tuned"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "tuned"


def _shapes_file(tmp_path, text, name="shapes.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


CASES = [
    # (arguments, fragment of the one-line message)
    (["tune", "--preset", "nope"], "unknown preset 'nope'"),
    (["tune", "--shapes", "4096by14336"], "write shapes as ROWSxCOLS"),
    (["tune", "--shapes", ""], "--shapes is empty"),
    (["tune", "--preset", "tiny", "--blocksizes", "48"], "blocksizes: 48 is not one of"),
    (["tune", "--preset", "tiny", "--blocksizes", "64,abc"], "--blocksizes: '64,abc' is not a comma-separated list of ints"),
    (["tune", "--preset", "tiny", "--quant-types", "int4"], "quant_types: 'int4' is not nf4 or fp4"),
    (["tune", "--preset", "tiny", "--dtypes", "float64"], "dtypes: 'float64' is not"),
    (["tune", "--preset", "tiny", "--variants", "nope", "--trials", "1"], "unknown variant 'nope'"),
    (["tune", "--preset", "tiny", "--variants", "linear_gemv", "--trials", "1"], "is a linear variant"),
    (["tune", "--preset", "tiny", "--family", "linear", "--m", "3"], "3 is not an M bucket"),
    (["tune", "--preset", "tiny", "--storage", "garbage"], "is not a database URL"),
    (["tune", "--preset", "tiny", "--storage", "foo://bar"], "unknown database 'foo'"),
    (["tune", "--preset", "tiny", "--storage", "redis://localhost/0"], "unknown database 'redis'"),
    (["tune", "--preset", "tiny", "--storage", "postgresql+asyncpg://u@localhost/db"], "driver is not installed"),
    # (psycopg2 is a test dependency; a machine without it, as the lent GPU host, gets the other message)
    (["tune", "--preset", "tiny", "--storage", "postgresql+psycopg2://u@127.0.0.1:1/db"],
     "does not answer" if importlib.util.find_spec("psycopg2") else "driver is not installed"),
    (["tune", "--preset", "tiny", "--storage", "sqlite:///"], "in memory: nothing would resume"),
    (["tune", "--preset", "tiny", "--storage", "sqlite:////nonexistent/dir/x.db"], "does not exist"),
    (["tune", "--shapes-file", "{tmp}/missing.yaml"], "no such file"),
    (["tune", "--shapes-file", "{tmp}"], "is a directory"),
    (["tune", "--shapes-file", "@empty"], "an empty file"),
    (["tune", "--shapes-file", "@list"], "expected a mapping of preset names"),
    (["tune", "--shapes-file", "@stringshape"], "bad shape [8, '64']"),
    (["tune", "--shapes-file", "@floatshape"], "bad shape [8, 64.5]"),
    (["tune", "--shapes-file", "@negshape"], "bad shape [8, -64]"),
    (["tune", "--shapes-file", "@unknownkey"], "unknown keys ['shapez']"),
    (["tune", "--shapes-file", "@dqoff"], "double_quant must be a non-empty list, got 'off'"),
    (["tune", "--shapes-file", "@dqfalse"], "double_quant: 'false' is not true or false"),
    (["tune", "--shapes-file", "@bsstring"], "blocksizes must be a non-empty list, got '64'"),
    (["tune", "--shapes-file", "@dtypestring"], "dtypes must be a non-empty list, got 'bfloat16'"),
]
FILES = {
    "empty": "", "list": "- 1\n- 2\n", "stringshape": "p:\n  shapes: [[8, '64']]\n",
    "floatshape": "p:\n  shapes: [[8, 64.5]]\n", "negshape": "p:\n  shapes: [[8, -64]]\n",
    "unknownkey": "p:\n  shapez: [[8, 64]]\n", "dqoff": "p:\n  shapes: [[8, 64]]\n  double_quant: \"off\"\n",
    "dqfalse": "p:\n  shapes: [[8, 64]]\n  double_quant: [\"false\"]\n", "bsstring": "p:\n  shapes: [[8, 64]]\n  blocksizes: \"64\"\n",
    "dtypestring": "p:\n  shapes: [[8, 64]]\n  dtypes: bfloat16\n",
}


@pytest.mark.parametrize("arguments, fragment", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_usage_errors_are_one_line_exit_2(arguments, fragment, config_dir, tmp_path, capsys):
    resolved = []
    for item in arguments:
        if item.startswith("@"):
            item = _shapes_file(tmp_path, FILES[item[1:]], f"{item[1:]}.yaml")
        resolved.append(item.replace("{tmp}", str(tmp_path)))
    assert cli.main(resolved) == cli.EXIT_USAGE
    output = capsys.readouterr().out
    assert fragment in " ".join(output.split()), output
    assert "Traceback" not in output
    assert not (config_dir / "triton-interpreter-cpu.json").exists(), "nothing may be tuned after a usage error"


@pytest.mark.parametrize("arguments", [["tune", "--trials", "-3"], ["tune", "--timeout", "-5"], ["tune", "--trials", "x"],
                                       ["bench", "--e2e", "--new-tokens", "0"], ["bench", "--e2e", "--layers", "x"]])
def test_bad_numbers_are_refused_by_the_parser(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(arguments)
    assert exit_info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "must be positive" in err or "is not a number" in err


def test_read_only_output_is_refused_before_tuning(config_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert cli.main(["tune", "--preset", "tiny", "--trials", "1", "--output", str(out)]) == cli.EXIT_USAGE
    finally:
        out.chmod(0o755)
    assert "is not writable" in capsys.readouterr().out


def test_version_and_debug():
    result = subprocess.run([sys.executable, "-m", "nf4_explorer.tuner", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("nf4-explorer ")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    quiet = subprocess.run([sys.executable, "-m", "nf4_explorer.tuner", "tune", "--preset", "nope"], capture_output=True,
                           text=True, env=env)
    loud = subprocess.run([sys.executable, "-m", "nf4_explorer.tuner", "--debug", "tune", "--preset", "nope"],
                          capture_output=True, text=True, env=env)
    assert quiet.returncode == cli.EXIT_USAGE and "Traceback" not in quiet.stdout + quiet.stderr
    assert "Traceback" in loud.stderr


def test_ctrl_c_during_a_tune_says_how_to_resume(config_dir, capsys, monkeypatch):
    from nf4_explorer.tuner import tune as tune_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_module, "tune", interrupted)
    assert cli.main(["tune", "--preset", "tiny", "--trials", "1"]) == cli.EXIT_INTERRUPTED
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted:") and "run the same command again to resume" in " ".join(lines)


def test_show_fits_80_columns_and_plots_every_gpu(tmp_path, capsys, monkeypatch):
    """The shipped files (two GPUs): one line per problem within 80 columns; --plot draws a panel each."""
    import io
    from pathlib import Path

    from rich.console import Console

    from nf4_explorer.tuner import show

    monkeypatch.delenv("NF4_EXPLORER_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    files = show.tuned_files("all")
    assert {f.stem for f in files} >= {"nvidia-h200", "nvidia-h100-80gb-hbm3"}
    for path in files:
        buffer = io.StringIO()
        show.render(Path(path), Console(file=buffer, width=80))
        lines = buffer.getvalue().splitlines()
        assert max(map(len, lines)) <= 80 and len(lines) == len(show.read(path)[0]["entries"]) + 5
    assert cli.main(["show", "--gpu", "all", "--plot", str(tmp_path / "all.png")]) == 0
    assert "2 panels" in capsys.readouterr().out and (tmp_path / "all.png").stat().st_size > 1000
    assert cli.main(["show", "--gpu", "all", "--plot", "/nonexistent/x.png"]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().out


def test_shipped_tunings_are_in_use():
    """Every shipped entry is usable with this install (whatever Triton pip picked)."""
    from nf4_explorer.tuner import show

    for path in show.tuned_files("all"):
        if path.parent.name == "tuned_configs":
            statuses = [row["status"] for row in show.rows(show.read(path)[0])]
            assert all(s.startswith("ok") for s in statuses), (path.name, [s for s in statuses if not s.startswith("ok")])


def test_show_on_a_gpu_without_a_file_names_the_nearest_card(capsys, monkeypatch, tmp_path):
    import torch

    from nf4_explorer import tuning

    monkeypatch.delenv("NF4_EXPLORER_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(cli, "_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(tuning, "device_name", lambda device: "NVIDIA H100 NVL")
    monkeypatch.setattr(tuning, "device_properties", lambda device: ((9, 0), 132))
    assert cli.main(["show"]) == 0
    output = " ".join(capsys.readouterr().out.split())
    assert "NVIDIA H100 NVL has no tuned file of its own: the dispatcher uses the nearest card's, NVIDIA H100 80GB HBM3" in output


@pytest.mark.parametrize("value, message", [("-1", "must be 0 or more"), ("x", "is not a number")])
def test_final_rounds_takes_zero_or_more(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tune", "--final-rounds", value])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err
