"""Tuning a fleet: two `nf4-explorer tune` workers share one Optuna study through a real PostgreSQL
server (started by .ci/run through scripts/postgres.sh, URL in $NF4_EXPLORER_TEST_POSTGRES)."""

import json
import os
import subprocess
import sys

import pytest

URL = os.environ.get("NF4_EXPLORER_TEST_POSTGRES")
TRIALS = 6
VARIANTS = ("where_gather", "word_unpack")


def test_ci_provides_the_server():
    # CI must run this test for real: a missing server is a failure there, not a skip.
    if os.environ.get("CI") and not URL:
        pytest.fail("CI=true but NF4_EXPLORER_TEST_POSTGRES is unset: .ci/run must start PostgreSQL")


@pytest.mark.skipif(not URL, reason="no PostgreSQL server (set NF4_EXPLORER_TEST_POSTGRES, see scripts/postgres.sh)")
def test_two_workers_share_one_study(tmp_path):
    import optuna
    import sqlalchemy

    engine = sqlalchemy.create_engine(URL)
    with engine.begin() as connection:  # a fresh schema: drop every table a previous run left
        connection.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public;"))
    engine.dispose()
    out_dir = tmp_path / "tuned"
    env = {**os.environ, "TRITON_INTERPRET": "1", "NF4_EXPLORER_CONFIG_DIR": str(out_dir)}
    command = [sys.executable, "-m", "nf4_explorer.tuner", "tune", "--preset", "tiny", "--shapes", "8x64,4x96",
               "--variants", ",".join(VARIANTS), "--trials", str(TRIALS), "--storage", URL,
               "--final-rounds", "0"]  # the entries are then the shared studies' bests, checked below
    # The first worker creates the tables; the second starts while the first is tuning.
    workers = [subprocess.Popen(command + ["--seed", str(seed)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]

    summaries = optuna.get_all_study_summaries(URL)
    assert len(summaries) == 2 * len(VARIANTS)  # one study per (GPU, variant, problem), shared by both workers
    best = {}
    for summary in summaries:
        study = optuna.load_study(study_name=summary.study_name, storage=URL)
        trials = study.get_trials(deepcopy=False)
        numbers = sorted(t.number for t in trials)
        assert numbers == list(range(len(trials))), "a trial was recorded twice or lost"
        finished = [t for t in trials if t.state.is_finished()]
        assert len(finished) == len(trials), "unfinished trials left behind"
        # Both workers stop at the budget; a race can add at most one trial per extra worker.
        assert TRIALS <= len(finished) <= TRIALS + 1
        _, variant, _, _, _, dtype, shape, _ = summary.study_name.split(":")
        candidate = (study.best_value, variant, study.best_params)
        best[shape] = min(best.get(shape, candidate), candidate, key=lambda c: c[0])

    (path,) = out_dir.glob("*.json")
    entries = {"x".join(map(str, e["shape"])): e for e in json.loads(path.read_text())["entries"]}
    assert set(entries) == set(best)
    for shape, (value, variant, params) in best.items():
        entry = entries[shape]
        assert (entry["variant"], entry["config"], entry["time_us"]) == (variant, params, round(value, 3)), shape
