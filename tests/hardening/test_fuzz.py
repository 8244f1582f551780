"""Property-based fuzzing of every input through the CLI's own entry, stopping at the plan.

Generated configs (wrong types, unknown keys, out-of-range and huge numbers, unicode, nested
garbage) and corrupted input files (truncated YAML; npz queries, safetensors models and npy suite
arrays truncated, bit-flipped, of the wrong dtype or shape) run ``attribution ... --dry-run``
in process (typer's runner, the same app object the console script calls), so no valid config
ever trains. Each must end with exit 0, or exit 2 and one ``error:`` line naming the key or
file — never a traceback. ``FUZZ_REPORT=path`` writes the outcome counts as JSON.
A few dozen cases also run as real CLI subprocesses (``test_fuzz_subprocesses``).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import LIN, cli_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from attribution_core.config import load_config
from attribution_core.pipeline import build_task, resolve
from attribution_core.testing import run_cli

OUTCOMES: dict[str, Counter] = defaultdict(Counter)
BASE_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def examples(env: str, default: int) -> settings:
    """Settings with ``max_examples`` from ``$env`` (default ``default``)."""
    return settings(BASE_SETTINGS, max_examples=int(os.environ.get(env, default)))


BASE = {k: v for k, v in LIN.items() if k != "evaluation"}
KEYS = [
    "task", "task.name", "task.n_train", "task.dim", "task.noise", "task.solver", "task.path",
    "queries", "queries.source", "queries.count", "queries.seed", "queries.path", "methods",
    "methods.0", "methods.0.damping", "methods.0.hessian", "methods.1.compressor",
    "methods.1.label", "methods.0.ensemble", "target", "target.name", "model", "model.path",
    "model.seed", "evaluation", "evaluation.lds.subsets", "seed", "threads", "device", "dtype",
    "precision", "chunk_size", "cache_dir", "executor", "executor.name",
]  # fmt: skip
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 1, 2, 3, 10**12, 2**63, -(2**63), 10**300])
    | st.floats(allow_nan=True, allow_infinity=True)
    | text
    | st.sampled_from(["cpu", "cuda", "meta", "grad-dot", "loss", "mse", "generated", "file"])
)
garbage = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8
)
paths = st.sampled_from(KEYS).map(lambda k: k.split(".")) | st.lists(text, min_size=1, max_size=3)


def _set(data: Any, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        key: Any = int(part) if part.isdigit() and isinstance(node, list) else part
        if isinstance(node, list):
            if not isinstance(key, int) or key >= len(node):
                return
            if not isinstance(node[key], dict):
                node[key] = {"name": node[key]} if isinstance(node[key], str) else {}
        elif isinstance(node, dict):
            if not isinstance(node.get(key), dict | list):
                node[key] = {}
        else:
            return
        node = node[key]
    last: Any = path[-1]
    if isinstance(node, list):
        if last.isdigit() and int(last) < len(node):
            node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value


def _check(kind: str, code: int, output: str, names: list[str]) -> None:
    """Exit 0, or exit 2 with an ``error:`` line naming one of ``names``; never a traceback."""
    OUTCOMES[kind][{0: "exit 0", 2: "exit 2"}.get(code, f"other ({code})")] += 1
    assert "Traceback" not in output, output
    assert code in (0, 2), output
    if code == 2:
        assert output.startswith("error: ") or "\nerror: " in output or "Usage:" in output
        assert any(n in output for n in names), (names, output)


def _dry(tmp: Path, data: Any, *args: str) -> tuple[int, str]:
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True))
    return run_cli("attribute", str(cfg), "--out", str(tmp / "out"), "--dry-run", *args)


@examples("FUZZ_CONFIGS", 520)
@given(st.lists(st.tuples(paths, garbage), min_size=1, max_size=3))
def test_fuzz_configs(tmp_path: Path, mutations: list) -> None:
    data = copy.deepcopy(BASE)
    for path, value in mutations:
        _set(data, path, value)
    code, out = _dry(tmp_path, data)
    names = ["config file", "methods", "memory", "task", "queries", "model", "device"]
    names += [p[0] for p, _ in mutations] + [str(p[-1]) for p, _ in mutations]
    _check("config", code, out, names)


@examples("FUZZ_OVERRIDES", 100)
@given(st.lists(st.tuples(paths, garbage), min_size=1, max_size=2))
def test_fuzz_set_overrides(tmp_path: Path, sets: list) -> None:
    args = []
    for path, value in sets:
        args += ["--set", f"{'.'.join(path)}={json.dumps(value, default=str)}"]
    code, out = _dry(tmp_path, BASE, *args)
    _check("--set", code, out, ["--set", "error: ", *[p[0] for p, _ in sets]])


def _damage(data: bytes, how: str, at: float) -> bytes:
    cut = int(len(data) * at)
    if how == "truncate":
        return data[:cut]
    if how == "flip":
        i = min(cut, len(data) - 1)
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
    if how == "garbage":
        return os.urandom(max(1, cut))
    return data[:cut] + b"\x00" * 16 + data[cut:]


damage = st.tuples(st.sampled_from(["truncate", "flip", "garbage", "insert"]), st.floats(0, 1))


@examples("FUZZ_YAML", 150)
@given(damage)
def test_fuzz_yaml_files(tmp_path: Path, dmg: tuple[str, float]) -> None:
    good = yaml.safe_dump(BASE).encode()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(_damage(good, *dmg))
    code, out = run_cli("attribute", str(cfg), "--out", str(tmp_path / "out"), "--dry-run")
    _check("yaml", code, out, [str(cfg), "task", "methods", "queries", "target", "key"])


ARRAYS = st.sampled_from(["good", "float16", "int8", "complex", "str", "object", "bool"]) | st.just(
    "shape"
)


def _query_arrays(kind: str) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(5, 4))
    y = np.zeros(5)
    if kind == "shape":
        return {"x": x[:, :3], "y": y}
    if kind == "str":
        return {"x": x.astype(str), "y": y}
    if kind == "object":
        return {"x": x.astype(object), "y": y}
    if kind == "complex":
        return {"x": x.astype(complex), "y": y}
    if kind == "good":
        return {"x": x, "y": y}
    return {"x": x.astype(kind), "y": y}


@examples("FUZZ_NPZ", 110)
@given(ARRAYS, damage | st.just(("none", 1.0)))
def test_fuzz_npz_queries(tmp_path: Path, kind: str, dmg: tuple[str, float]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **_query_arrays(kind))
    path = tmp_path / "q.npz"
    path.write_bytes(_damage(buf.getvalue(), *dmg) if dmg[0] != "none" else buf.getvalue())
    data = {**copy.deepcopy(BASE), "queries": {"source": "file", "path": str(path), "count": 5}}
    code, out = _dry(tmp_path, data)
    _check("npz", code, out, [str(path), "queries"])


@functools.cache
def _state() -> dict[str, torch.Tensor]:
    return build_task(resolve(load_config(BASE))).build_model(0).state_dict()


def _model_tensors(kind: str) -> dict[str, torch.Tensor]:
    state = _state()
    if kind == "shape":
        return {k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in state.items()}
    if kind in ("str", "object", "complex"):
        return {f"{k}.extra": v for k, v in state.items()}
    if kind == "good":
        return dict(state)
    return {k: v.to(getattr(torch, kind)) for k, v in state.items()}


@examples("FUZZ_SAFETENSORS", 110)
@given(ARRAYS, damage | st.just(("none", 1.0)))
def test_fuzz_safetensors_models(tmp_path: Path, kind: str, dmg: tuple[str, float]) -> None:
    blob = st_save({k: v.contiguous() for k, v in _model_tensors(kind).items()})
    path = tmp_path / "m.safetensors"
    path.write_bytes(_damage(blob, *dmg) if dmg[0] != "none" else blob)
    data = {**copy.deepcopy(BASE), "model": {"path": str(path), "seed": 0}}
    code, out = _dry(tmp_path, data)
    _check("safetensors", code, out, [str(path), "model.path"])


@pytest.fixture(scope="module")
def suite_copy(lin_suite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(lin_suite, tmp_path_factory.mktemp("fz") / "suite"))


NPY_FILES = ["masks.npy", "truth/mse.npy", "queries/samples.npy", "base/model.safetensors"]


@examples("FUZZ_NPY", 30)
@given(st.sampled_from(NPY_FILES), damage, st.booleans(), ARRAYS)
def test_fuzz_suite_arrays(
    suite_copy: Path, tmp_path: Path, rel: str, dmg: tuple[str, float], rehash: bool, kind: str
) -> None:
    """A damaged suite file: refused by the integrity check, or — re-hashed as if it had been
    built that way (``rehash``) — by the loaders; wrong dtypes/shapes of masks likewise."""
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example
    suite = Path(shutil.copytree(suite_copy, tmp_path / "suite"))
    target = suite / rel
    if rel == "masks.npy" and kind not in ("good", "shape"):
        buf = io.BytesIO()
        np.save(buf, np.load(target).astype(object if kind == "str" else kind), allow_pickle=True)
        target.write_bytes(buf.getvalue())
    elif rel == "masks.npy" and kind == "shape":
        np.save(target, np.load(target)[:, :-1])
    else:
        target.write_bytes(_damage(target.read_bytes(), *dmg))
    if rehash:
        run_cli("suite", "verify", str(suite), "--write")
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "evaluation": {"suite": str(suite)}}))
    code, out = run_cli("bench", str(cfg), "--out", str(tmp_path / "o"), "--dry-run")
    _check("npy (suite)", code, out, [str(suite), "evaluation.suite"])


SUBPROCESS_CASES = [
    ("garbage yaml", b"task: {name: [\n  - :"),
    ("not a mapping", b"- 1\n- 2\n"),
    ("unknown key", yaml.safe_dump({**BASE, "bogus": 1}).encode()),
    ("unknown task", yaml.safe_dump({**BASE, "task": {"name": "nope"}}).encode()),
    ("bad count", yaml.safe_dump({**BASE, "queries": {"count": -3}}).encode()),
    ("huge count", yaml.safe_dump({**BASE, "queries": {"count": 10**30}}).encode()),
    ("unicode label", yaml.safe_dump({**BASE, "methods": [{"name": "grad-dot", "label": "λ✓"}]},
                                     allow_unicode=True).encode()),
    ("nested garbage", yaml.safe_dump({**BASE, "methods": [{"name": {"a": [1, {"b": None}]}}]}).encode()),
    ("bad device", yaml.safe_dump({**BASE, "device": "quantum:7"}).encode()),
    ("cuda absent", yaml.safe_dump({**BASE, "device": "cuda:9"}).encode()),
    ("nan damping", yaml.safe_dump({**BASE, "methods": [{"name": "kfac-influence", "damping": float("nan")}]}).encode()),
    ("string threads", yaml.safe_dump({**BASE, "threads": "many"}).encode()),
    ("huge dim", yaml.safe_dump({**BASE, "task": {"name": "linear-regression", "dim": 2**62}}).encode()),
    ("empty file", b""),
    ("binary", bytes(range(256))),
    ("valid", yaml.safe_dump(BASE).encode()),
    ("methods empty", yaml.safe_dump({**BASE, "methods": []}).encode()),
    ("methods not a list", yaml.safe_dump({**BASE, "methods": 7}).encode()),
    ("truncated", yaml.safe_dump(BASE).encode()[:37]),
    ("bad dtype", yaml.safe_dump({**BASE, "dtype": "float8"}).encode()),
    ("inf chunk", yaml.safe_dump({**BASE, "chunk_size": float("inf")}).encode()),
    ("missing query file", yaml.safe_dump({**BASE, "queries": {"source": "file", "path": "/nope.npz"}}).encode()),
    ("missing model file", yaml.safe_dump({**BASE, "model": {"path": "/nope.safetensors"}}).encode()),
    ("bad hessian", yaml.safe_dump({**BASE, "methods": [{"name": "grad-dot", "hessian": {"name": "x"}}]}).encode()),
]  # fmt: skip
SUBPROCESS_NAMES = ["task", "queries", "methods", "device", "threads", "bogus", "memory", "dtype"]
SUBPROCESS_NAMES += ["chunk_size", "model.path"]
FAST = 8  # the default run: the first FAST cases; -m slow runs them all


@pytest.mark.parametrize(
    "name,content",
    [
        c if i < FAST else pytest.param(*c, marks=pytest.mark.slow)
        for i, c in enumerate(SUBPROCESS_CASES)
    ],
    ids=[c[0] for c in SUBPROCESS_CASES],
)
def test_fuzz_subprocesses(tmp_path: Path, name: str, content: bytes) -> None:
    """Real CLI processes: exit 0 or 2, one error line, no traceback."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(content)
    code, out = cli_run("attribute", str(cfg), "--out", str(tmp_path / "out"), "--dry-run")
    _check(
        "subprocess",
        code,
        out,
        [str(cfg), *SUBPROCESS_NAMES],
    )


def teardown_module() -> None:
    if path := os.environ.get("FUZZ_REPORT"):
        Path(path).write_text(json.dumps({k: dict(v) for k, v in OUTCOMES.items()}, indent=2))
