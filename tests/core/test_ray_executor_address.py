"""A Ray address where no cluster answers fails within 10 s with a ConfigError naming the address
and how to start a cluster; the CLI exits 2 (issue 20, acceptance 3).  No Ray instance is
started here (the positive check, against a live GCS, is in test_ray_executor_retries.py)."""

from __future__ import annotations

import socket
import time

import pytest

from attribution_core.errors import ConfigError
from attribution_core.ray_address import check_ray_address
from attribution_core.testing import run_attribute

pytest.importorskip("ray")

UNROUTABLE = "10.255.255.1:6379"  # no cluster (a transparent proxy may still accept the TCP)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free again once closed: nothing listens there


def _assert_helpful(message: str, address: str) -> None:
    assert address in message, message
    assert "ray start --head --port=6379" in message and "HEAD_IP:6379" in message, message
    assert "leave `address` out" in message, message


@pytest.mark.parametrize("address", [UNROUTABLE, "ray://10.255.255.1:10001"])
def test_unreachable_address_fails_within_10s(address):
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_ray_address(address)
    assert time.monotonic() - start < 10.0
    _assert_helpful(str(err.value), address)


def test_refused_port_fails_fast():
    address = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(ConfigError, match="cannot connect") as err:
        check_ray_address(address)
    assert time.monotonic() - start < 5.0
    _assert_helpful(str(err.value), address)


@pytest.mark.parametrize("address", ["10.0.0.5", "10.0.0.5:port", "http://x", ":6379"])
def test_malformed_address_names_the_forms(address):
    with pytest.raises(ConfigError, match="expected 'HOST:PORT'") as err:
        check_ray_address(address)
    assert repr(address) in str(err.value)


def test_auto_without_a_cluster(monkeypatch):
    import ray._private.services as services

    def nothing(addr, temp_dir):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "get_ray_address_from_environment", nothing)
    with pytest.raises(ConfigError, match="no cluster was started on this machine") as err:
        check_ray_address("auto")
    _assert_helpful(str(err.value), "auto")


def test_cli_exits_2_within_10s(tmp_path):
    config = {
        "task": {"name": "linear-regression", "n_train": 16, "dim": 2},
        "queries": {"count": 2},
        "target": "mse",
        "methods": ["grad-dot"],
        "executor": {"name": "ray", "address": UNROUTABLE},
    }
    start = time.monotonic()
    code, out = run_attribute(config, tmp_path / "out", "--quiet")
    elapsed = time.monotonic() - start
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out
    _assert_helpful(errors[0], UNROUTABLE)
    assert elapsed < 10.0, elapsed


def test_silent_listener_fails_within_10s():
    """Something accepts the connection but never answers (the case where ray.init hangs)."""
    with socket.socket() as server:
        server.bind(("", 0))  # all interfaces: Ray maps 127.0.0.1 to the node's IP
        server.listen(8)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConfigError, match="no Ray GCS answered") as err:
            check_ray_address(address)
        assert time.monotonic() - start < 10.0
    _assert_helpful(str(err.value), address)


def test_client_address_without_the_ray_client_says_how_to_start_a_cluster(monkeypatch):
    """Plain `ray` (no grpc): a ray:// address is refused with the same advice."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real(name, *a)
    )
    with pytest.raises(ConfigError) as err:
        check_ray_address("ray://10.255.255.1:10001")
    _assert_helpful(str(err.value), "ray://10.255.255.1:10001")
    assert "ray[client]" in str(err.value)
