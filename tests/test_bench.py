"""`nf4-explorer bench`: which config each provider runs, the CSV it writes, the refusal without a
GPU (CPU), and on a GPU the whole command on a small problem. Timings are not asserted: the bench
is a command, its figures live in docs/performance.md."""

import csv
import math

import pytest
import torch

import nf4_explorer
from nf4_explorer.tuner import bench, cli, timing
from nf4_explorer.tuner.problems import Problem

SMALL = Problem((256, 512), "bfloat16", 64, True, "nf4")


def _entry(problem, winner, config, others):
    return {**problem.key(), "variant": winner, "config": config,
            "others": {name: {"config": cfg, "time_us": 2.0} for name, cfg in others.items()}}


def test_variant_configs_take_the_tuned_winner_and_runners_up_else_defaults():
    tuned = {"WORDS": 256, "TABLE_IN_REGISTERS": True, "num_warps": 2}
    runner_up = {"BLOCK": 512, "TABLE_IN_REGISTERS": False, "num_warps": 4}
    other_problem = Problem((512, 512), "bfloat16", 64, True, "nf4")
    entries = [
        _entry(other_problem, "word_unpack", {"WORDS": 128, "TABLE_IN_REGISTERS": False, "num_warps": 8}, {}),
        _entry(SMALL, "word_unpack", tuned, {"where_gather": runner_up, "phase_split": {
            "CHUNK": 1024, "STAGED": 13, "CTAS_PER_SM": 4, "num_warps": 8}}),
    ]
    configs = bench.variant_configs(SMALL, entries, "cpu")
    assert configs["word_unpack"] == tuned
    assert configs["where_gather"] == runner_up
    assert configs["per_row"] == nf4_explorer.get("per_row").default_config(64)
    # Only what runs on the device: phase_split (a Gluon kernel, tuned above) not on the CPU.
    assert set(configs) == set(nf4_explorer.names("cpu")) and "phase_split" not in configs


def test_rows_report_bandwidth_and_share_of_copy():
    row = bench._row(SMALL, "x", "", 10.0, 2000.0)
    gbps = SMALL.bytes_moved() / 10e-6 / 1e9
    assert math.isclose(row.gbps, gbps) and math.isclose(row.pct_copy, 100 * gbps / 2000.0)


def test_csv_has_one_line_per_row(tmp_path):
    rows = [bench._row(SMALL, "nf4-explorer (dispatcher)", "", 10.0, 2000.0),
            bench._row(SMALL, "word_unpack", "WORDS=256", 12.0, 2000.0)]
    rows[0].speedup_vs_bnb = 1.5
    bench.write_csv(rows, tmp_path / "bench.csv")
    lines = list(csv.DictReader((tmp_path / "bench.csv").read_text().splitlines()))
    assert [r["provider"] for r in lines] == ["nf4-explorer (dispatcher)", "word_unpack"]
    assert lines[1]["config"] == "WORDS=256" and float(lines[0]["us"]) == 10.0
    assert lines[0]["speedup_vs_bnb"] == "1.5" and lines[1]["speedup_vs_bnb"] == ""


def test_best_loop_seconds_alternates_providers_and_keeps_each_best(monkeypatch):
    runs = []
    times = iter([5.0, 7.0, 4.0, 9.0, 6.0, 8.0])
    monkeypatch.setattr(timing, "loop_seconds", lambda calls, repeats: runs.append(calls[0]) or next(times))
    best = timing.best_loop_seconds({"a": ["a"], "b": ["b"]}, repeats=10, trials=3)
    assert runs == ["a", "b"] * 3
    assert best == {"a": 4.0, "b": 7.0}


@pytest.mark.parametrize("config", timing.READ_CONFIGS)
def test_the_read_floor_kernel_reads_every_word_once(device, config):
    # A floor kernel that skipped or repeated words would time fewer or more bytes than it claims.
    chunk = config[0]
    for n_words in (1, chunk - 1, chunk + 1, 2 * chunk + 808):
        src = torch.randint(-2**20, 2**20, (n_words,), dtype=torch.int32, device=device)
        sums = timing.read_words(src, *config)
        chunks = torch.nn.functional.pad(src, (0, sums.numel() * chunk - n_words)).view(-1, chunk).sum(dim=1)
        assert torch.equal(sums.cpu(), chunks.to(torch.int32).cpu())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_without_a_gpu_refuses(capsys):
    assert cli.main(["bench", "--shapes", "256x512"]) == 2
    assert "bench times kernels on a CUDA GPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_bench_command_on_a_small_problem(tmp_path, capsys):
    assert cli.main(["bench", "--shapes", "256x512", "--dtypes", "bfloat16", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "bench.csv").read_text().splitlines()))
    providers = [r["provider"] for r in rows]
    expected = ["floor (copy rate + empty launch)", "copy (same bytes)", "nf4-explorer (dispatcher)",
                *nf4_explorer.names("cuda"), "torch reference"]
    assert [p for p in providers if p != "bitsandbytes"] == expected
    assert all(float(r["us"]) > 0 and float(r["gbps"]) > 0 for r in rows)
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "copy bandwidth" in capsys.readouterr().out


@pytest.mark.gpu
def test_loop_and_dispatcher_cost_report_every_provider():
    loop = bench.loop_comparison([SMALL], repeats=5, trials=1)
    assert {"nf4-explorer", "nf4-explorer GPU time (CUDA graph)"} <= set(loop)
    assert all(seconds > 0 for seconds in loop.values())
    cost = bench.dispatcher_overhead_us(SMALL, calls=20, trials=2)
    assert set(cost) == {"direct", "dispatcher", "overhead"}
    assert math.isclose(cost["overhead"], cost["dispatcher"] - cost["direct"])
