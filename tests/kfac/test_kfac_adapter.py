"""``attribution_kfac.curvlinops_adapter``: the one door to curvlinops, and its version check.

* An unsupported or missing curvlinops is refused with one message naming the installed
  version, the supported range and the fix — directly, and through every Hessian that uses
  curvlinops (the ``curvlinops`` back-end, type-2's loss Hessian, ``ggn-cg``).
* No other module of the plugin imports curvlinops or names its private fields.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from attribution_kfac import curvlinops_adapter
from attribution_kfac.ggn_cg import GGNCGHessian
from attribution_kfac.kfac import EKFACHessian, KFACHessian
from kfac_toys import fit

from attribution_core import ConfigError

pytest.importorskip("curvlinops")

REFUSED = (
    r"curvlinops-for-pytorch {v} is installed, but attribution_kfac supports "
    r"curvlinops-for-pytorch>=3\.0,<3\.1 only .* pip install"
)


@pytest.fixture
def unknown_version(monkeypatch):
    """Pretend curvlinops-for-pytorch 4.0.0 is installed."""
    monkeypatch.setattr(curvlinops_adapter, "installed_version", lambda: "4.0.0")
    return "4.0.0"


def test_installed_version_is_supported():
    version = curvlinops_adapter.check_version()
    assert version == metadata.version("curvlinops-for-pytorch")
    assert curvlinops_adapter.module().KFACLinearOperator is not None


@pytest.mark.parametrize("version", ["4.0.0", "3.1.0", "2.9.9", "nightly"])
def test_unknown_version_is_refused(monkeypatch, version):
    monkeypatch.setattr(curvlinops_adapter, "installed_version", lambda: version)
    with pytest.raises(ConfigError, match=REFUSED.format(v=re.escape(version))):
        curvlinops_adapter.module()


@pytest.mark.parametrize(
    "hessian",
    [
        KFACHessian(backend="curvlinops"),
        EKFACHessian(backend="curvlinops"),
        KFACHessian(fisher="type-2"),  # hooks back-end, curvlinops' loss Hessian square root
        GGNCGHessian(),
    ],
    ids=["kfac-curvlinops", "ekfac-curvlinops", "kfac-hooks-type2", "ggn-cg"],
)
def test_fit_refuses_unknown_version(unknown_version, conv_task, hessian):
    with pytest.raises(ConfigError, match=REFUSED.format(v=re.escape(unknown_version))):
        fit(hessian, conv_task)


def test_hooks_back_end_needs_no_curvlinops_internals(unknown_version, conv_task):
    """The default back-end with an MC Fisher never calls into curvlinops."""
    _, _, curv = fit(KFACHessian(), conv_task)
    assert curv.describe()["backend"] == "hooks"


def test_missing_curvlinops_is_refused(monkeypatch):
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    curvlinops_adapter.installed_version.cache_clear()
    monkeypatch.setattr(curvlinops_adapter.metadata, "version", missing)
    try:
        with pytest.raises(ConfigError, match="curvlinops-for-pytorch is not installed"):
            curvlinops_adapter.check_version()
    finally:
        curvlinops_adapter.installed_version.cache_clear()


PRIVATE = re.compile(
    r"\b(import curvlinops|from curvlinops|_input_covariances|_gradient_covariances|"
    r"_corrected_eigenvalues|_model_func|_mapping|_loop_over_data)\b"
)


def test_only_the_adapter_touches_curvlinops():
    root = Path(curvlinops_adapter.__file__).parent
    offenders = [
        f"{path.name}:{i}: {line.strip()}"
        for path in sorted(root.glob("*.py"))
        if path.name != "curvlinops_adapter.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not offenders, "curvlinops used outside curvlinops_adapter.py:\n" + "\n".join(offenders)
