"""The search drivers: Optuna (default) and triton.autotune (exhaustive reference).

Both search the spaces the variants declare. A candidate's output is checked against the reference
once before it is timed; configs that fail to compile, run out of resources or give a wrong output
are pruned (Optuna) or dropped (exhaustive), never picked. The few fastest configs of a problem's
search are then timed again, in interleaved rounds (:func:`final_round`), and the winner is picked
on those times: one disturbed timing in a search does not decide an entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

import nf4_explorer
from nf4_explorer import tuning
from nf4_explorer.tuning import LAUNCH_PARAMS, launch_parameters, prepare

from . import timing
from .problems import LinearProblem, Problem


class CandidateFailed(Exception):
    """A config that cannot be a winner: it did not compile, ran out of resources or was wrong."""


@dataclasses.dataclass
class Workload:
    """One problem's inputs on the device, with its reference output and a poisoned output buffer."""

    problem: Problem
    packed: torch.Tensor
    state: object
    reference: torch.Tensor
    out: torch.Tensor

    @classmethod
    def make(cls, problem: Problem, device) -> "Workload":
        packed, state = problem.make_inputs(device)
        reference = nf4_explorer.reference_dequantize(packed, state)
        return cls(problem, packed, state, reference, torch.empty_like(reference))


@dataclasses.dataclass
class LinearWorkload:
    """One linear problem's inputs on the device, its float64 reference and the family's tolerance
    (twice cuBLAS's error plus one ulp), and the exact F.linear output linear_dequantize must equal."""

    problem: LinearProblem
    x: torch.Tensor
    packed: torch.Tensor
    state: object
    reference: torch.Tensor
    bound: float
    dense: torch.Tensor

    @classmethod
    def make(cls, problem: LinearProblem, device) -> "LinearWorkload":
        x, packed, state = problem.make_inputs(device)
        reference = tuning.reference_linear(x, packed, state)
        bound = tuning.tolerance(x, packed, state, reference=reference)
        dense = torch.nn.functional.linear(x, nf4_explorer.reference_dequantize(packed, state).to(x.dtype))
        return cls(problem, x, packed, state, reference, bound, dense)


def make_workload(problem, device):
    return LinearWorkload.make(problem, device) if isinstance(problem, LinearProblem) else Workload.make(problem, device)


def measure_linear(workload: LinearWorkload, name: str, config: dict) -> float:
    """Median µs of linear variant ``name`` at ``config``; raises CandidateFailed if it cannot run, or
    is outside the family's tolerance (linear_dequantize: not bit-identical to F.linear)."""
    variant = nf4_explorer.get(name)
    make_args = lambda: tuning.prepare_linear(workload.x, workload.packed, workload.state)  # noqa: E731
    args = make_args()
    refusal = variant.accepts(args)
    if refusal is not None:
        raise CandidateFailed(refusal)
    try:
        variant.launch(args, config)
        if workload.x.is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # compile errors, out of resources, launch failures
        raise CandidateFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
    out = args.result()
    if name == "linear_dequantize":
        if not torch.equal(out, workload.dense):
            raise CandidateFailed("not bit-identical to F.linear")
    else:
        error = (out.double() - workload.reference).abs().max().item()
        if not error <= workload.bound:
            raise CandidateFailed(f"error {error:.3g} over the tolerance {workload.bound:.3g}")
    return timing.median_us(lambda: variant.launch(make_args(), config), device=workload.x.device, warmup_ms=10,
                            rep_ms=40)


def measure(workload, name: str, config: dict) -> float:
    """Median µs of variant ``name`` at ``config``; raises CandidateFailed if it cannot run or is wrong."""
    if isinstance(workload, LinearWorkload):
        return measure_linear(workload, name, config)
    variant = nf4_explorer.get(name)
    args = prepare(workload.packed, workload.state, workload.out)
    try:
        workload.out.fill_(float("nan"))
        variant.launch(args, config)
        if workload.out.is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # compile errors, out of resources, launch failures
        raise CandidateFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
    if not torch.equal(workload.out, workload.reference):
        raise CandidateFailed("wrong output")
    # Shorter than bench's 25/100 ms: a median over ~40 ms of runs (hundreds of launches at these
    # sizes) is stable to about 1%, and it keeps the default tune in minutes.
    return timing.median_us(lambda: variant.launch(args, config), device=workload.out.device, warmup_ms=10, rep_ms=40)


def study_name(device_slug: str, name: str, problem: Problem) -> str:
    """The Optuna study of (GPU, variant, problem). It ends with the variant's kernel hash, so a
    changed kernel or search space starts a new study: an old one's timings are stale, and Optuna
    refuses a categorical whose values changed."""
    key = problem.key()
    family = f"linear:m{key['m_bucket']}:" if key.get("family") == "linear" else ""
    return (f"{device_slug}:{family}{name}:{key['quant_type']}:bs{key['blocksize']}:dq{int(key['double_quant'])}:"
            f"{key['out_dtype']}:{'x'.join(map(str, key['shape']))}:k{tuning.kernel_hash(name)}")


def default_storage() -> str:
    """SQLite file in the user's cache directory: an interrupted tune resumes where it stopped."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "nf4-explorer" / "optuna.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


_STORAGES: dict[str, object] = {}


class StorageRefused(ValueError):
    """An Optuna storage URL that cannot serve: said in one line, before any tuning."""


def check_storage(url: str, timeout_s: int = 5) -> None:
    """Refuses, within ``timeout_s`` seconds, a storage URL that cannot work: not a URL, an unknown
    database, a driver that is not installed, a database that does not answer, or an SQLite
    database in memory (nothing would resume)."""
    import sqlalchemy
    import sqlalchemy.exc

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageRefused(f"--storage {url!r} is not a database URL: use e.g. sqlite:////path/to/optuna.db or "
                             "postgresql+psycopg2://user@host/db") from None
    try:
        parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageRefused(f"--storage {url!r}: unknown database {parsed.drivername!r}: use sqlite, postgresql, "
                             "mysql or another SQLAlchemy database") from None
    except ImportError as exc:
        raise StorageRefused(f"--storage {url!r}: its driver is not installed ({exc}): pip install it, or use "
                             "sqlite:////path/to/optuna.db") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise StorageRefused(f"--storage {url!r} is an SQLite database in memory: nothing would resume; use "
                                 "sqlite:////path/to/optuna.db")
        directory = Path(parsed.database).expanduser().resolve().parent
        if not directory.is_dir():
            raise StorageRefused(f"--storage {url!r}: the directory {directory} does not exist: create it first")
        return
    connect_args = {"connect_timeout": timeout_s} if parsed.get_backend_name() in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args)
        with engine.connect():
            pass
        engine.dispose()
    except ImportError as exc:
        raise StorageRefused(f"--storage {url!r}: its driver is not installed ({exc}): pip install it") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200]
        raise StorageRefused(f"--storage {url!r}: the database does not answer ({reason}): check the host, the "
                             "credentials and that the server runs") from None


def open_storage(url: str):
    """Optuna RDB storage for ``url``, opened once per process. Several workers starting together
    on one fresh database race to create Optuna's tables (a duplicate-type error on PostgreSQL):
    the loser retries after the winner has finished."""
    import optuna
    import sqlalchemy.exc

    if url not in _STORAGES:
        for attempt in range(10):
            try:
                _STORAGES[url] = optuna.storages.RDBStorage(url)
                break
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
                if attempt == 9:
                    raise
                time.sleep(0.5 * (attempt + 1))
    return _STORAGES[url]


def narrowed(name: str, narrow: Mapping[str, Sequence] | None = None):
    """Variant ``name`` with each parameter it shares with ``narrow`` searched over those values only
    (``tune --space``); its entries still stamp the registered variant's kernel hash, valid for the
    whole space."""
    variant = nf4_explorer.get(name)
    keep = {key: tuple(values) for key, values in (narrow or {}).items() if key in variant.space}
    return dataclasses.replace(variant, space={**variant.space, **keep}) if keep else variant


def check_narrow(names: Sequence[str], narrow: Mapping[str, Sequence]) -> None:
    """Raises ValueError naming the problem if ``narrow`` (``tune --space``) names a parameter none of
    ``names`` has, or a value outside a variant's space."""
    for key, values in narrow.items():
        owners = [nf4_explorer.get(name) for name in names if key in nf4_explorer.get(name).space]
        if not owners:
            raise ValueError(f"--space {key}: none of the variants tuned ({', '.join(names)}) has a parameter {key}")
        for variant in owners:
            for value in values:
                if not variant.searches(key, value):
                    raise ValueError(f"--space {key}={value!r}: {variant.name} searches {key} over "
                                     f"{list(variant.space[key])}")


def start_configs(path: Path, name: str, blocksize: int, narrow: Mapping[str, Sequence] | None = None) -> list[dict]:
    """Where a new study of variant ``name`` starts: its default config, then its configs in the
    tuned file at ``path`` (other problems' winners and runners-up), each once. A config from before
    a parameter was added takes the parameter's default; one that is not valid here is left out. An
    unreadable file gives just the default (the merge that follows says what is wrong with it)."""
    import json

    variant = narrowed(name, narrow)
    found = [variant.default_config(blocksize)]
    try:
        document = json.loads(path.read_text())
        entries = document.get("entries") if isinstance(document, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            others = entry.get("others") if isinstance(entry.get("others"), dict) else {}
            for variant_name, result in [(entry.get("variant"), entry), *others.items()]:
                if variant_name == name and isinstance(result, dict) and isinstance(result.get("config"), dict):
                    found.append({**variant.default, **result["config"]})
    except (OSError, ValueError, RecursionError):
        pass
    starts = []
    for config in found:
        try:
            variant.check_config(config, blocksize)
        except (ValueError, TypeError):
            continue
        if config not in starts:
            starts.append(config)
    return starts


def optuna_search(workload: Workload, name: str, *, trials: int, storage: str, seed: int, device_slug: str,
                  deadline: float | None, on_trial: Callable[[float | None], None],
                  start: list[dict] = (), narrow: Mapping[str, Sequence] | None = None) -> tuple[list[dict], int]:
    """Seeded TPE over the variant's space, in a study shared through ``storage``. A new study first
    times ``start`` (at most half the budget: see :func:`start_configs`); a study that has trials
    runs only those it still lacks (resume). Returns (its configs {"config", "time_us"}, fastest first,
    trials in study)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    variant = narrowed(name, narrow)
    blocksize = workload.problem.blocksize
    label = study_name(device_slug, name, workload.problem)
    if variant.space != nf4_explorer.get(name).space:  # a narrowed space is a study of its own
        label += ":s" + hashlib.sha256(repr(sorted(variant.space.items())).encode()).hexdigest()[:8]
    study = optuna.create_study(
        study_name=label, storage=open_storage(storage), direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed), load_if_exists=True,
    )
    space_size = len(variant.configs(blocksize))
    budget = min(trials, space_size)
    measured: dict[tuple, float] = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        measured[tuple(sorted(trial.params.items()))] = trial.value
    if not study.get_trials(deepcopy=False):
        for config in list(start)[:max(1, budget // 2)]:
            study.enqueue_trial(config)

    def objective(trial):
        config = {key: trial.suggest_categorical(key, list(values)) for key, values in variant.space.items()}
        if not variant.allowed(config, blocksize):
            raise optuna.TrialPruned("config not valid for this blocksize")
        key = tuple(sorted(config.items()))
        if key in measured:  # TPE re-suggests categorical points; do not re-time them
            return measured[key]
        try:
            value = measure(workload, name, config)
        except CandidateFailed as exc:
            trial.set_user_attr("failure", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        measured[key] = value
        return value

    finished = lambda: len(study.get_trials(deepcopy=False, states=(
        optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
    while finished() < budget and (deadline is None or time.time() < deadline):
        study.optimize(objective, n_trials=1, catch=())
        on_trial(_best_value(study))
    ranked: dict[tuple, dict] = {}  # one per config (a resumed study may hold repeats)
    for trial in sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                        key=lambda trial: trial.value):
        ranked.setdefault(tuple(sorted(trial.params.items())), {"config": dict(trial.params), "time_us": trial.value})
    return list(ranked.values()), finished()


def _best_value(study) -> float | None:
    try:
        return study.best_trial.value
    except ValueError:  # no complete trial
        return None


def exhaustive_search(workload: Workload, name: str, *, on_trial: Callable[[float | None], None],
                      narrow: Mapping[str, Sequence] | None = None) -> tuple[list[dict], int]:
    """triton.autotune over the variant's whole (valid) space, or its ``narrow``-ed part; the
    winner's output is checked against the reference. Returns (configs {"config", "time_us"}, fastest
    first: every config for the linear family, the winner for dequantize; configs timed)."""
    import triton

    variant = narrowed(name, narrow)
    configs = variant.configs(workload.problem.blocksize)
    if isinstance(workload, LinearWorkload):
        # Every config timed in turn (a linear variant's launcher builds its own arguments).
        timed = []
        for config in configs:
            try:
                timed.append({"config": config, "time_us": measure(workload, name, config)})
            except CandidateFailed:
                pass
            on_trial(min((t["time_us"] for t in timed), default=None))
        return sorted(timed, key=lambda t: t["time_us"]), len(configs)
    triton_configs = [
        triton.Config({k: v for k, v in c.items() if k not in LAUNCH_PARAMS}, **launch_parameters(c))
        for c in configs
    ]
    device = workload.out.device
    timings: dict[int, float] = {}

    def bench(fn, quantiles=None, **kwargs):
        try:
            value = timing.median_us(fn, device=device) / 1000.0
        except Exception:
            value = float("inf")
        on_trial(min(timings.values(), default=None))
        timings[len(timings)] = value * 1000.0
        return [value, value, value] if quantiles else value

    from nf4_explorer.tuning import launch_options

    tuned = triton.autotune(configs=triton_configs, key=["n"], do_bench=bench)(variant.kernel)
    args = prepare(workload.packed, workload.state, workload.out)
    arguments = args.kernel_arguments()
    tuned[lambda meta: variant.grid(args, meta)](*arguments.runtime, **arguments.constexprs, **launch_options())
    best = tuned.best_config
    config = {**best.kwargs, "num_warps": best.num_warps}
    if "num_stages" in variant.space:
        config["num_stages"] = best.num_stages
    config = {k: config[k] for k in variant.space}
    try:
        time_us = measure(workload, name, config)
    except CandidateFailed:
        return [], len(configs)
    return [{"config": config, "time_us": time_us}], len(configs)


# The final round: the FINALISTS fastest configs of a problem's search (at most PER_VARIANT of a
# variant), each timed FINAL_ROUNDS more times, interleaved. Session 13's tune read the best
# linear_mma_gemv config of 4096x14336 at M = 2 at 35.2 µs and kept another variant's 31.6 µs
# entry; session 14 timed that space's best at 28.3 (docs/performance.md).
# The CLI's --final-rounds help states these numbers.
FINALISTS, PER_VARIANT, FINAL_ROUNDS = 4, 2, 3


def final_round(workload, ranked: Mapping[str, list[dict]], rounds: int = FINAL_ROUNDS) -> dict[str, dict]:
    """Re-times the search's fastest configs (``ranked``: variant -> its configs, fastest first) in
    ``rounds`` interleaved rounds; returns variant -> its best config, with the median of its rounds
    for those re-timed and the search's time for the others. A finalist that fails in any round is
    not picked (a variant whose finalists all failed is left out). Nothing to choose between (one
    candidate), or ``rounds`` 0: the search's bests as they are."""
    bests = {name: dict(configs[0]) for name, configs in ranked.items() if configs}
    finalists = sorted(((name, c) for name, configs in ranked.items() for c in configs[:PER_VARIANT]),
                       key=lambda pair: pair[1]["time_us"])[:FINALISTS]
    if len(finalists) < 2 or rounds < 1:
        return bests
    times: list[list[float]] = [[] for _ in finalists]
    for _ in range(rounds):
        for (name, candidate), samples in zip(finalists, times):
            try:
                samples.append(measure(workload, name, candidate["config"]))
            except CandidateFailed:  # it ran in the search: a config that fails now is not picked
                samples.append(float("inf"))
    retimed: dict[str, dict] = {}
    for (name, candidate), samples in zip(finalists, times):
        time_us = max(samples) if float("inf") in samples else statistics.median(samples)
        if name not in retimed or time_us < retimed[name]["time_us"]:
            retimed[name] = {"config": candidate["config"], "time_us": time_us}
    bests.update(retimed)
    return {name: best for name, best in bests.items() if best["time_us"] < float("inf")}


def tune(problems: list[Problem], *, names: list[str], driver: str = "optuna", trials: int = 16,
         timeout: float | None = None, storage: str | None = None, output_dir: Path | None = None,
         seed: int = 0, device=None, console=None, narrow: Mapping[str, Sequence] | None = None,
         final_rounds: int = FINAL_ROUNDS) -> tuple[Path, list[dict]]:
    """Tunes every variant in ``names`` on every problem and merges the winners into this GPU's
    tuned file in ``output_dir`` (default: $NF4_EXPLORER_CONFIG_DIR if set, else the user's config
    directory: where the dispatcher looks first). ``narrow``: parameter -> the values to search,
    for every variant that has the parameter (see :func:`narrowed`). The winner of a problem is
    picked on :func:`final_round`'s times (``final_rounds`` 0: on the search's). Returns (file, new
    entries)."""
    from tqdm import tqdm

    from . import cache_writer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name in names:  # unknown names, and variants this device cannot run, fail before any work
        reason = nf4_explorer.get(name).unavailable_reason(device)
        if reason is not None:
            raise ValueError(reason)
    check_narrow(names, narrow or {})
    device_slug = tuning.slug(tuning.device_name(device))
    storage = storage or default_storage()
    if driver == "optuna":
        check_storage(storage)
    output_dir = Path(output_dir) if output_dir else tuning.search_dirs()[0][1]
    path = output_dir / f"{device_slug}.json"
    cache_writer.check_output(path)
    deadline = time.time() + timeout if timeout else None
    copy_gbps = timing.copy_bandwidth_gbps(device) if device.type == "cuda" else None
    def budget(name: str, problem: Problem) -> int:
        space = len(narrowed(name, narrow).configs(problem.blocksize))
        return space if driver == "exhaustive" else min(trials, space)

    total = sum(budget(n, p) for n in names for p in problems)
    header = cache_writer.device_info(device)
    if copy_gbps:
        header["copy_bandwidth_gbps"] = round(copy_gbps, 1)
    entries = []
    # In a terminal the bar redraws ~10 times a second; into a log file (CI, a cluster job) it
    # writes a line at most every 30 s instead of one per trial.
    bar = tqdm(total=total, unit="trial", desc="tuning", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    try:
        for index, problem in enumerate(problems, 1):
            workload = make_workload(problem, device)
            ranked, spent = {}, 0
            for name in names:
                bar.set_description(f"[{index}/{len(problems)}] {problem.label()} {name}", refresh=False)

                def on_trial(best_us):
                    bar.update(1)
                    if best_us is not None:
                        bar.set_postfix_str(f"best {best_us:.1f} µs", refresh=False)

                if driver == "exhaustive":
                    timed, count = exhaustive_search(workload, name, on_trial=on_trial, narrow=narrow)
                else:
                    timed, count = optuna_search(workload, name, trials=trials, storage=storage, seed=seed,
                                                 device_slug=device_slug, deadline=deadline, on_trial=on_trial,
                                                 start=start_configs(path, name, problem.blocksize, narrow),
                                                 narrow=narrow)
                spent += count
                ranked[name] = timed
            bar.set_description(f"[{index}/{len(problems)}] {problem.label()} final round", refresh=True)
            bests = final_round(workload, ranked, final_rounds)
            if bests:
                winner_name = min(bests, key=lambda n: bests[n]["time_us"])
                winner = {"variant": winner_name, **bests[winner_name]}
                entries.append(cache_writer.make_entry(problem, winner, bests, driver=driver, trials=spent,
                                                       copy_gbps=copy_gbps))
                # Written after every problem: an interrupted tune keeps what it finished.
                cache_writer.merge(path, entries[-1:], header)
            del workload
            if deadline is not None and time.time() >= deadline:
                break
    finally:
        bar.close()
    return path, entries
