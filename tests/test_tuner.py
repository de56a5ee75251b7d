"""The tuning pipeline on the CPU (interpreter, tiny shapes): drivers, the tuned file, the
dispatcher's fallback chain, concurrent writers, resume, and the CLI."""

import json
import multiprocessing
import warnings

import pytest
import torch

import nf4_explorer
from nf4_explorer import _cache, _dispatch
from nf4_explorer.tuner import cache_writer, cli
from nf4_explorer.tuner.problems import Problem, expand, load_presets, parse_shapes
from nf4_explorer.tuner.tune import Workload, optuna_search, tune
from helpers import assert_bit_equal

TINY = Problem((8, 64), "bfloat16", 64, True, "nf4")


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    directory = tmp_path / "tuned"
    monkeypatch.setenv("NF4_EXPLORER_CONFIG_DIR", str(directory))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return directory


def _inputs(problem=TINY):
    return problem.make_inputs("cpu" if not torch.cuda.is_available() else "cuda")


def _fake_gpu(monkeypatch, name="Fake GPU 9000"):
    monkeypatch.setattr(_cache, "device_name", lambda device: name)
    return _cache.slug(name)


def _entry(problem, variant, config, **extra):
    return {**problem.key(), "variant": variant, "config": config, "time_us": 1.0, "gbps": 1.0, "pct_of_copy": 1.0,
            "others": {}, "driver": "test", "trials": 1, "date": "2026-11-27",
            "triton_version": _cache.triton_minor(), "kernel_hash": _cache.kernel_hash(variant), **extra}


def _write(path, entries, **top):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": 1, "device_name": "Fake GPU 9000", "entries": entries, **top}))


def test_optuna_pipeline_writes_a_file_the_dispatcher_follows(config_dir, device):
    path, entries = tune([TINY], names=["where_gather", "word_unpack"], trials=3, device=device)
    assert path.parent == config_dir and path.is_file()
    doc = json.loads(path.read_text())
    assert list(doc)[0] == "schema_version" and not _cache.validate_document(doc)
    (entry,) = doc["entries"]
    assert entry["driver"] == "optuna" and entry["variant"] in ("where_gather", "word_unpack")
    assert set(entry["others"]) | {entry["variant"]} == {"where_gather", "word_unpack"}
    assert entry["kernel_hash"] == _cache.kernel_hash(entry["variant"])
    packed, state = _inputs()
    _dispatch.reset()
    choice = nf4_explorer.explain(packed, state)
    assert (choice.variant, dict(choice.config), choice.reason) == (entry["variant"], entry["config"], "tuned (exact)")
    assert_bit_equal(nf4_explorer.dequantize(packed, state), nf4_explorer.reference_dequantize(packed, state))


def test_exhaustive_driver_times_the_whole_space(config_dir, device):
    _, (entry,) = tune([TINY], names=["word_unpack"], driver="exhaustive", device=device)
    assert entry["driver"] == "exhaustive"
    assert entry["trials"] == len(nf4_explorer.get("word_unpack").configs(64))
    nf4_explorer.get("word_unpack").check_config(entry["config"], 64)


def test_interrupted_optuna_study_resumes(config_dir, device, tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    workload = Workload.make(TINY, device)
    kwargs = dict(storage=storage, seed=0, device_slug="fake", deadline=None, on_trial=lambda best: None)
    _, first = optuna_search(workload, "where_gather", trials=2, **kwargs)
    _, second = optuna_search(workload, "where_gather", trials=5, **kwargs)
    assert (first, second) == (2, 5)  # the second run adds 3 trials, it does not start over
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.n_trials == 5


def test_a_changed_search_space_starts_a_new_study(config_dir, device, tmp_path, monkeypatch):
    """A study of the old space is not resumed: Optuna refuses a categorical whose values changed
    ("dynamic value space"), and the old timings are stale anyway."""
    import dataclasses

    import optuna
    from nf4_explorer import _registry

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    workload = Workload.make(TINY, device)
    kwargs = dict(storage=storage, seed=0, device_slug="fake", deadline=None, on_trial=lambda best: None)
    assert optuna_search(workload, "where_gather", trials=3, **kwargs)[1] == 3
    old = nf4_explorer.get("where_gather")
    key, values = next((k, v) for k, v in old.space.items() if len(v) > 1)
    narrower = dataclasses.replace(old, space={**old.space, key: tuple(v for v in values if v == old.default[key])})
    monkeypatch.setitem(_registry._REGISTRY, "where_gather", narrower)
    _cache.kernel_hash.cache_clear()  # the hash covers the space; it is cached per name
    try:
        ranked, count = optuna_search(workload, "where_gather", trials=2, **kwargs)
    finally:
        _cache.kernel_hash.cache_clear()  # (the old variant is back at teardown)
    assert count == 2 and ranked and all(timed["config"][key] == old.default[key] for timed in ranked)
    assert len(optuna.get_all_study_summaries(storage)) == 2


def test_a_new_study_starts_from_the_default_and_the_files_configs(device, tmp_path):
    """A new study first times the variant's default, then its configs tuned for other problems in
    the file being merged into (a winner's and a runner-up's; one from before a parameter was
    added takes that parameter's default; an invalid one is left out)."""
    import optuna

    from nf4_explorer.tuner.tune import start_configs

    variant = nf4_explorer.get("where_gather")
    configs = [c for c in variant.configs(64) if c != variant.default_config(64)]
    winner, runner_up = configs[0], configs[-1]
    # A config from before num_warps was a parameter (one whose completion is none of the above).
    old = next(o for o in ({k: v for k, v in c.items() if k != "num_warps"} for c in configs)
               if {**variant.default, **o} not in (variant.default_config(64), winner, runner_up))
    other = Problem((16, 64), "bfloat16", 64, True, "nf4")
    path = tmp_path / "fake.json"
    _write(path, [_entry(other, "where_gather", winner, others={"where_gather": {"config": runner_up, "time_us": 2}}),
                  _entry(other, "per_row", nf4_explorer.get("per_row").default_config(64)),
                  _entry(other, "where_gather", old), _entry(other, "where_gather", {**winner, "BLOCK": 3})])
    expected = [variant.default_config(64), winner, runner_up, {**variant.default, **old}]
    assert start_configs(path, "where_gather", 64) == expected
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "corrupt.json").write_text('{"entries": [')
    (tmp_path / "entries.json").write_text('{"entries": {"variant": "where_gather"}}')
    for broken in ("missing.json", "list.json", "corrupt.json", "entries.json"):  # just the default, no error
        assert start_configs(tmp_path / broken, "where_gather", 64) == [variant.default_config(64)], broken
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna_search(Workload.make(TINY, device), "where_gather", trials=6, storage=storage, seed=0, device_slug="fake",
                  deadline=None, on_trial=lambda best: None, start=expected)
    study = optuna.load_study(study_name=optuna.get_all_study_summaries(storage)[0].study_name, storage=storage)
    assert [t.params for t in study.trials[:3]] == expected[:3]  # half the budget


def _merge_worker(path, shape):
    entry = _entry(Problem(shape, "bfloat16"), "word_unpack", nf4_explorer.get("word_unpack").default_config(64))
    cache_writer.merge(path, [entry], {"device_name": "Fake GPU 9000"})


def test_two_writers_lose_no_entry(tmp_path):
    path = tmp_path / "fake-gpu-9000.json"
    context = multiprocessing.get_context("spawn")
    shapes = [(16 * (i + 1), 64) for i in range(8)]
    processes = [context.Process(target=_merge_worker, args=(path, s)) for s in shapes]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    doc = json.loads(path.read_text())
    assert sorted(tuple(e["shape"]) for e in doc["entries"]) == sorted(shapes)


def test_exact_then_nearest_bucket_then_default(config_dir, monkeypatch):
    slug = _fake_gpu(monkeypatch)
    tuned = Problem((8, 64), "bfloat16")
    config = {"BLOCK": 512, "TABLE_IN_REGISTERS": True, "num_warps": 2}
    _write(config_dir / f"{slug}.json", [_entry(tuned, "where_gather", config)])
    packed, state = _inputs(tuned)
    exact = nf4_explorer.explain(packed, state)
    assert (exact.variant, dict(exact.config), exact.reason) == ("where_gather", config, "tuned (exact)")
    packed, state = _inputs(Problem((32, 64), "bfloat16"))
    assert nf4_explorer.explain(packed, state).reason == "tuned (nearest bucket)"
    packed, state = _inputs(Problem((8, 64), "float16"))  # no entry of this dtype
    default = nf4_explorer.explain(packed, state)
    assert (default.variant, default.reason) == (_dispatch.DEFAULT_VARIANT, "default")


def test_overrides_win(config_dir, monkeypatch):
    packed, state = _inputs()
    monkeypatch.setenv("NF4_EXPLORER_VARIANT", "per_row")
    assert (nf4_explorer.explain(packed, state).variant, nf4_explorer.explain(packed, state).reason) == ("per_row", "environment")
    choice = nf4_explorer.explain(packed, state, variant="tiled_2d")
    assert (choice.variant, choice.reason) == ("tiled_2d", "argument")


@pytest.mark.parametrize("content, cause", [
    ("{not json", "cannot be read"),
    ('{"schema_version": 1, "entries": [', "cannot be read"),  # truncated
    ('{"schema_version": 99, "entries": []}', "schema_version is 99"),
    ("[]", "top level is not a JSON object"),
    (b"\xff\xfe\x00", "cannot be read"),
])
def test_broken_file_warns_once_and_falls_back(config_dir, monkeypatch, content, cause):
    slug = _fake_gpu(monkeypatch)
    config_dir.mkdir(parents=True)
    path = config_dir / f"{slug}.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    packed, state = _inputs()
    expected = nf4_explorer.reference_dequantize(packed, state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert_bit_equal(nf4_explorer.dequantize(packed, state), expected)
    messages = [str(w.message) for w in caught if "nf4-explorer" in str(w.message)]
    assert len(messages) == 1 and str(path) in messages[0] and cause in messages[0]
    assert nf4_explorer.explain(packed, state).reason == "default"


def test_an_entry_tuned_with_another_triton_keeps_serving(config_dir, monkeypatch):
    """A Triton upgrade keeps the tuned entries whose kernels are unchanged, and says so."""
    slug = _fake_gpu(monkeypatch)
    config = {"BLOCK": 512, "TABLE_IN_REGISTERS": True, "num_warps": 2}
    entry = _entry(TINY, "where_gather", config)
    entry["triton_version"] = "2.9"
    _write(config_dir / f"{slug}.json", [entry])
    packed, state = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no staleness warning
        choice = nf4_explorer.explain(packed, state)
    assert (choice.variant, dict(choice.config), choice.reason) == ("where_gather", config, "tuned (exact)")
    assert "tuned with Triton 2.9" in choice.detail


def test_an_edited_helper_makes_the_entry_stale(config_dir, monkeypatch):
    """The kernel hash covers the variant's whole module (helpers, grid, space), not just the kernel."""
    import inspect
    import sys

    name = "where_gather"
    before = _cache.kernel_hash(name)
    module = sys.modules[nf4_explorer.get(name).kernel.fn.__module__]
    original = inspect.getsource
    edit = "\nEDITED_HELPER = 1\n"
    monkeypatch.setattr(inspect, "getsource", lambda obj: original(obj) + (edit if obj is module else ""))
    _cache.kernel_hash.cache_clear()
    try:
        assert _cache.kernel_hash(name) != before
        assert _cache.kernel_hash("per_row") == _cache.kernel_hash("per_row")
        entry = _entry(TINY, name, {"BLOCK": 512, "TABLE_IN_REGISTERS": True, "num_warps": 2}, kernel_hash=before)
        assert "changed since it was tuned" in _cache.entry_problem(entry)
    finally:
        monkeypatch.undo()
        _cache.kernel_hash.cache_clear()


def test_a_kernel_hash_covers_the_variant_modules_it_imports(monkeypatch):
    """A variant built from a sibling variant's helpers (``from .linear_lut_gemm import split_k_run``)
    hashes that module too, and what it imports in turn; shared ``_`` modules are hashed by name."""
    import inspect
    import sys
    import types

    sources = {"pkg.a": "from ._decode import q\nfrom .b import helper\n", "pkg.b": "from .c import deeper\nfrom .a import back\n",
               "pkg.c": "x = 1\n"}
    modules = {name: types.ModuleType(name) for name in sources}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    original = inspect.getsource
    monkeypatch.setattr(inspect, "getsource",
                        lambda obj: sources[obj.__name__] if getattr(obj, "__name__", None) in sources else original(obj))
    assert [m.__name__ for m in _cache._variant_imports(modules["pkg.a"])] == ["pkg.b", "pkg.c"]
    assert _cache._variant_imports(modules["pkg.c"]) == []


def test_a_kernel_hash_covers_the_shared_code_its_variant_uses(monkeypatch):
    """Of the shared device code (``_decode``) and of sibling variant modules, a hash covers what the
    variant's modules import and what that uses in turn (table values, and calls that change a
    used object, included): an edit elsewhere leaves its entries valid."""
    import inspect
    import sys
    import types

    shared_source = ('"""Doc."""\nimport struct\nfrom ._format import TABLE\nA = 1\nB = [A]\nB.append(A + 1)\n\n\n'
                     '@jit\ndef f(config):\n    return B[config]\n\n\ndef g():\n    return struct.pack\n\n\n'
                     'register(f, allowed=lambda config: config["X"])\nC = TABLE\n')
    sources = {"pkg._shared": shared_source, "pkg.a": "from ._shared import (\n    f,\n)\n",
               "pkg.b": "from ._shared import C\n", "pkg.c": "from . import _shared\n"}
    modules = {name: types.ModuleType(name) for name in sources}
    modules["pkg._shared"].TABLE = (0.5, -1.0)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    original = inspect.getsource
    monkeypatch.setattr(inspect, "getsource",
                        lambda obj: sources[obj.__name__] if getattr(obj, "__name__", None) in sources else original(obj))
    shared = modules["pkg._shared"]
    # f, what it uses, the call that changes B; not g, its import, the call that only passes f along
    assert _cache.used_code(shared, [modules["pkg.a"]]) == (
        "A = 1\nB = [A]\nB.append(A + 1)\n@jit\ndef f(config):\n    return B[config]")
    assert _cache.used_code(shared, [modules["pkg.b"]]) == "from ._format import TABLE\nTABLE = (0.5, -1.0)\nC = TABLE"
    assert _cache.used_code(shared, [modules["pkg.a"], modules["pkg.c"]]) == _cache.code_only(shared_source)
    monkeypatch.setattr(inspect, "getsource", original)

    # The real ones: _f32_immediate builds block_planes' asm (linear_mma_gemv's), not per_row's helpers;
    # _select8 is under per_row's dequantize_codes only; linear_gemv_gluon takes _block_table from
    # linear_mma_gemv, not its checks.
    import nf4_explorer.linear_mma_gemv as mma_gemv
    from nf4_explorer import _decode

    names = ("linear_mma_gemv", "linear_gemv_gluon", "per_row", "phase_split")
    before = {name: _cache.kernel_hash(name) for name in names}
    for module, old, new, changed in (
            (_decode, '"0f%08X"', '"0f%08x"', {"linear_mma_gemv", "linear_gemv_gluon"}),
            (_decode, "b0 = (code & 1) != 0", "b0 = (code & 1) == 1", {"per_row"}),
            (_decode, "# QUANT_TYPE constexpr values.", "# QUANT_TYPE values.", set()),
            (mma_gemv, "reads x as pairs of 16-bit values", "reads x in pairs", {"linear_mma_gemv"}),
            (mma_gemv, 'is_pure=True, pack=1)\n\n\n@gluon.jit\ndef _absmax',
             'is_pure=False, pack=1)\n\n\n@gluon.jit\ndef _absmax', {"linear_mma_gemv", "linear_gemv_gluon"})):
        source = original(module)
        assert old in source, old
        monkeypatch.setattr(inspect, "getsource", lambda obj, module=module, source=source.replace(old, new):
                            source if obj is module else original(obj))
        _cache.kernel_hash.cache_clear()
        try:
            assert {name for name in names if _cache.kernel_hash(name) != before[name]} == changed, old
        finally:
            monkeypatch.setattr(inspect, "getsource", original)
            _cache.kernel_hash.cache_clear()


def test_an_edit_of_comments_or_docstrings_leaves_the_entries_valid(monkeypatch):
    """The kernel hash covers code only: prose edits keep a tuned file's entries (and its studies)."""
    import inspect
    import sys

    source = ('"""Module docstring."""\nimport math  # why\n\n\ndef f(a):\n    """Docstring."""\n'
              '    # a note\n    asm = """\nmov.b32 $0, 1;\n"""\n    return a + 1  # trailing\n')
    prose = (source.replace("Module docstring.", "Another one.").replace("# why", "# because")
             .replace('"""Docstring."""', '"""Docstring,\n\n    longer."""').replace("    # a note\n", ""))
    assert _cache.code_only(prose) == _cache.code_only(source)
    assert "mov.b32 $0, 1;" in _cache.code_only(source)  # a string that is a value is code
    for code in (source.replace("a + 1", "a + 2"), source.replace("$0, 1", "$0, 2"), source.replace("math", "cmath")):
        assert _cache.code_only(code) != _cache.code_only(source)
    method = '    def g(self):\n        """Doc."""\n        return """\nat column 0\n"""\n'  # does not dedent
    assert _cache.code_only(method) == '    def g(self):\n        return """\nat column 0\n"""'
    assert _cache.code_only("x = (\n") == "x = (\n"  # what tokenize refuses is hashed as it is

    name = "where_gather"
    before = _cache.kernel_hash(name)
    module = sys.modules[nf4_explorer.get(name).kernel.fn.__module__]
    original = inspect.getsource
    # The module's first blank-line gap gets a comment (prose), or a documented function (code).
    for inserted, same in (("\n# a note on the kernel\n\n\n", True),
                           ('\n\n\ndef later():\n    """Documented."""\n\n\n', False)):
        monkeypatch.setattr(inspect, "getsource", lambda obj, inserted=inserted: (
            original(obj).replace("\n\n\n", inserted, 1) if obj is module else original(obj)))
        _cache.kernel_hash.cache_clear()
        try:
            assert (_cache.kernel_hash(name) == before) is same
        finally:
            monkeypatch.undo()
            _cache.kernel_hash.cache_clear()


@pytest.mark.parametrize("stale, cause", [
    (dict(kernel_hash="0" * 16), "changed since it was tuned"),
    (dict(variant="retired_variant"), "unknown variant"),
    (dict(config={"BLOCK": 3}), "invalid config"),
])
def test_stale_entries_are_ignored_with_one_warning(config_dir, monkeypatch, stale, cause):
    slug = _fake_gpu(monkeypatch)
    entry = _entry(TINY, "where_gather", {"BLOCK": 512, "TABLE_IN_REGISTERS": True, "num_warps": 2})
    entry.update(stale)
    _write(config_dir / f"{slug}.json", [entry])
    packed, state = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_bit_equal(nf4_explorer.dequantize(packed, state), nf4_explorer.reference_dequantize(packed, state))
        nf4_explorer.dequantize(packed, state)
    messages = [str(w.message) for w in caught if "nf4-explorer" in str(w.message)]
    assert len(messages) == 1 and cause in messages[0]
    assert nf4_explorer.explain(packed, state).reason == "default"


def test_merge_replaces_a_corrupt_file_and_keeps_order(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("garbage")
    doc = cache_writer.merge(path, [_entry(TINY, "per_row", nf4_explorer.get("per_row").default_config(64))], {})
    assert list(doc)[0] == "schema_version" and len(doc["entries"]) == 1
    assert json.loads(path.read_text()) == doc


def test_merge_falls_back_to_the_runner_up_when_the_winner_kernel_changed(tmp_path):
    """A file tuned before a kernel edit: the entry whose winner's kernel changed takes its fastest
    runner-up whose kernel did not (the hashes the file recorded), with that runner-up's time; an
    entry with no such runner-up stays as it was (the dispatcher then skips it with a warning)."""
    per_row = nf4_explorer.get("per_row").default_config(64)
    word = nf4_explorer.get("word_unpack").default_config(64)
    others = {"word_unpack": {"config": word, "time_us": 2.0}, "per_row": {"config": per_row, "time_us": 3.0},
              "where_gather": {"config": nf4_explorer.get("where_gather").default_config(64), "time_us": 1.5}}
    stale = _entry(TINY, "block_tile", nf4_explorer.get("block_tile").default_config(64), kernel_hash="0" * 16,
                   others=others, gbps=100.0)
    alone = _entry(Problem((4, 32)), "block_tile", nf4_explorer.get("block_tile").default_config(64), kernel_hash="0" * 16)
    no_gpu = _entry(Problem((4, 64)), "block_tile", nf4_explorer.get("block_tile").default_config(64), kernel_hash="0" * 16,
                    others=others, pct_of_copy=None)  # tuned in the interpreter: no copy bandwidth
    hashes = {name: _cache.kernel_hash(name) for name in nf4_explorer.names(family=None)}
    hashes["where_gather"] = "1" * 16  # changed since too: not a valid runner-up
    path = tmp_path / "x.json"
    _write(path, [stale, alone, no_gpu], kernel_hashes=hashes)
    doc = cache_writer.merge(path, [], {})
    entry = next(e for e in doc["entries"] if e["shape"] == list(TINY.shape))
    assert (entry["variant"], entry["config"], entry["time_us"], entry["gbps"]) == ("word_unpack", word, 2.0, 50.0)
    assert _cache.entry_problem(entry) is None and set(entry["others"]) == {"per_row"}
    assert next(e for e in doc["entries"] if e["shape"] == [4, 32]) == alone
    entry = next(e for e in doc["entries"] if e["shape"] == [4, 64])
    assert (entry["variant"], entry["pct_of_copy"], entry["gbps"]) == ("word_unpack", None, 0.5)


def test_a_narrowed_tune_keeps_the_files_runners_up(tmp_path):
    """A re-tune of one variant replaces the entry but keeps, as runners-up, what the file measured of
    the variants it did not tune (the old winner included), unless their kernels changed since."""
    word = nf4_explorer.get("word_unpack").default_config(64)
    gather = nf4_explorer.get("where_gather").default_config(64)
    per_row = nf4_explorer.get("per_row").default_config(64)
    tile = nf4_explorer.get("block_tile").default_config(64)
    hashes = {name: _cache.kernel_hash(name) for name in nf4_explorer.names(family=None)}
    hashes["per_row"] = "1" * 16  # changed since the file was written: its old time says nothing now
    old = _entry(TINY, "word_unpack", word, time_us=2.0,
                 others={"where_gather": {"config": gather, "time_us": 3.0},
                         "per_row": {"config": per_row, "time_us": 4.0},
                         "block_tile": {"config": tile, "time_us": 9.0}})
    path = tmp_path / "x.json"
    _write(path, [old], kernel_hashes=hashes)
    new = _entry(TINY, "block_tile", tile, time_us=1.5)  # tuned alone (tune --variants block_tile)
    (entry,) = cache_writer.merge(path, [new], {})["entries"]
    assert (entry["variant"], entry["time_us"]) == ("block_tile", 1.5)
    assert entry["others"] == {"word_unpack": {"config": word, "time_us": 2.0},
                               "where_gather": {"config": gather, "time_us": 3.0}}


def test_presets_and_shapes():
    presets = load_presets()
    llm = expand(presets["llm"])
    assert {p.dtype for p in llm} == {"bfloat16", "float16"} and all(p.blocksize == 64 and p.double_quant for p in llm)
    assert Problem((14336, 4096), "bfloat16") in llm and Problem((8192, 28672), "float16") in llm
    assert parse_shapes("4096x14336, 1024x4096") == [(4096, 14336), (1024, 4096)]
    with pytest.raises(ValueError, match="ROWSxCOLS"):
        parse_shapes("4096by14336")


@pytest.fixture
def wide_console(monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(cli, "console", Console(width=300))


def test_cli_tune_show_check(config_dir, capsys, tmp_path, wide_console):
    assert cli.main(["tune", "--preset", "tiny", "--shapes", "4x64", "--trials", "2", "--variants", "where_gather"]) == 0
    assert cli.main(["show", "--gpu", "all", "--plot", str(tmp_path / "show.png")]) == 0
    output = capsys.readouterr().out
    assert "where_gather" in output and "4x64 nf4/64 bf16" in output
    assert cli.main(["show", "--gpu", "all", "--wide"]) == 0
    assert "4x64 nf4 bs64 dq bfloat16" in capsys.readouterr().out
    assert cli.main(["show", "--gpu", "all", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["entries"][0]["variant"] == "where_gather" and listed["entries"][0]["status"] == "ok"
    assert (tmp_path / "show.png").stat().st_size > 1000
    assert cli.main(["check"]) == 0
    assert "all variants exact" in capsys.readouterr().out
    assert cli.main(["check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failures"] == 0 and {r["variant"] for r in report["results"]} >= set(nf4_explorer.names("cpu"))


def test_cli_tune_space_narrows_the_search(config_dir, capsys, wide_console, tmp_path):
    """--space PARAM=V1,V2 searches only those values (both drivers; a narrowed Optuna study is a
    study of its own); a parameter no tuned variant has, or a value outside the space, is one error."""
    base = ["tune", "--preset", "tiny", "--shapes", "4x64", "--variants", "where_gather", "--json"]
    assert cli.main([*base, "--driver", "exhaustive", "--space", "BLOCK=1024", "--space", "TABLE_IN_REGISTERS=true"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["entries"]
    assert entry["config"]["BLOCK"] == 1024 and entry["config"]["TABLE_IN_REGISTERS"] is True
    assert entry["trials"] == len([c for c in nf4_explorer.get("where_gather").configs(64)
                                   if c["BLOCK"] == 1024 and c["TABLE_IN_REGISTERS"]])
    assert cli.main([*base, "--trials", "3", "--space", "BLOCK=4096,512"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["entries"]
    assert entry["config"]["BLOCK"] in (4096, 512)
    assert cli.main([*base, "--space", "SPLIT_K=2"]) == 2
    assert "none of the variants tuned (where_gather) has a parameter SPLIT_K" in capsys.readouterr().out
    assert cli.main([*base, "--space", "BLOCK=3"]) == 2
    assert "where_gather searches BLOCK over [512, 1024, 2048, 4096]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main([*base, "--space", "BLOCK"])


def test_cli_tune_refuses_a_variant_this_device_cannot_run(config_dir, capsys, wide_console, device):
    if nf4_explorer.get("phase_split").unavailable_reason(device) is None:
        pytest.skip("this GPU runs phase_split")
    assert cli.main(["tune", "--preset", "tiny", "--variants", "phase_split", "--trials", "1"]) == 2
    assert "needs an NVIDIA GPU of compute capability 8.0" in capsys.readouterr().out


def test_the_final_round_picks_on_retimed_medians(monkeypatch):
    """The search read word_unpack's best at 4 µs, a lucky reading (it runs in 4.5), and where_gather's
    at 5 (it runs in 3): the final round re-times the fastest few, interleaved, and where_gather wins
    on its median; a config that fails when re-timed is never picked; 0 rounds keeps the search's."""
    from nf4_explorer.tuner import tune as tune_module

    true_us = {("where_gather", 1): 3.0, ("where_gather", 2): 6.0, ("word_unpack", 1): 4.5, ("tiled_2d", 1): None}
    calls = []

    def measure(workload, name, config):
        calls.append((name, config["id"]))
        value = true_us[(name, config["id"])]
        if value is None:
            raise tune_module.CandidateFailed("out of resources")
        return value + 0.1 * (len(calls) % 2)  # a little noise

    monkeypatch.setattr(tune_module, "measure", measure)
    ranked = {"where_gather": [{"config": {"id": 1}, "time_us": 5.0}, {"config": {"id": 2}, "time_us": 6.0}],
              "word_unpack": [{"config": {"id": 1}, "time_us": 4.0}],
              "tiled_2d": [{"config": {"id": 1}, "time_us": 1.0}]}
    bests = tune_module.final_round(None, ranked, rounds=3)
    assert len(calls) == 3 * 4  # every finalist (at most two a variant, four in all), each round
    assert [name for name, _ in calls[:4]] == ["tiled_2d", "word_unpack", "where_gather", "where_gather"]
    assert min(bests, key=lambda name: bests[name]["time_us"]) == "where_gather"
    assert bests["where_gather"]["config"] == {"id": 1} and 3.0 <= bests["where_gather"]["time_us"] <= 3.1
    assert 4.5 <= bests["word_unpack"]["time_us"] <= 4.6 and "tiled_2d" not in bests
    calls.clear()
    assert tune_module.final_round(None, ranked, rounds=0) == {name: configs[0] for name, configs in ranked.items()}
    alone = {"word_unpack": ranked["word_unpack"]}
    assert tune_module.final_round(None, alone) == {"word_unpack": ranked["word_unpack"][0]}
    assert not calls  # nothing to choose between: nothing re-timed
