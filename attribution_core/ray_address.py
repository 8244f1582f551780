"""Checking a Ray cluster address before ``ray.init`` — which can hang for minutes on an address
where no cluster answers — so that a bad ``executor.address`` fails within 10 s with a
:class:`~attribution_core.errors.ConfigError` naming the address and how to start a cluster.

Holds :func:`check_ray_address` (the check) and its steps: :func:`resolve_auto` (what
``auto`` means: ``RAY_ADDRESS`` or the cluster ``ray start`` recorded on this machine),
:func:`split_host_port`, :func:`tcp_probe` (something listens) and :func:`protocol_probe` (a Ray
GCS, or for ``ray://`` a Ray Client server, answers; run in a subprocess with a hard timeout,
because Ray's clients retry for up to a minute and cannot be interrupted in-process).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

from attribution_core.errors import ConfigError

TCP_TIMEOUT_S = 2.0
PROTOCOL_TIMEOUT_S = 6.0

HOW_TO_START = (
    "start a cluster with `ray start --head --port=6379` on the head node (and "
    "`ray start --address=HEAD_IP:6379` on the others), then set "
    "`executor: {name: ray, address: HEAD_IP:6379}`; or leave `address` out to start a local "
    "Ray instance"
)

# Run in a subprocess: exit 0 iff a Ray GCS (argv[2] == "gcs") or a Ray Client server ("client")
# answers at argv[1].
_PROBE = """
import sys
address, kind, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
try:
    if kind == "gcs":
        import ray._raylet
        ray._raylet.GcsClient(address=address)
    else:
        import grpc
        from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc
        try:
            from ray._private.grpc_utils import init_grpc_channel
            channel = init_grpc_channel(address)
        except Exception:
            channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=timeout)
        request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(request, timeout=timeout)
except Exception as exc:
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    why = " ".join(str(details).split()) or "no details"
    sys.stderr.write(f"\\nPROBE: {type(exc).__name__}: {why}\\n")
    sys.exit(3)
"""


def _fail(address: str, why: str) -> ConfigError:
    return ConfigError(f"executor.address: no Ray cluster at {address!r} ({why}); {HOW_TO_START}")


def resolve_auto() -> str:
    """The address ``auto`` stands for: ``RAY_ADDRESS``, else the cluster that ``ray start``
    last recorded on this machine (``/tmp/ray/ray_current_cluster``); ConfigError if neither."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        return env
    try:  # Ray's own lookup (private): honours RAY_TMPDIR and finds running GCS processes
        from ray._private.services import get_ray_address_from_environment

        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        found = None
    except Exception:
        path = os.path.join("/tmp", "ray", "ray_current_cluster")
        found = open(path).read().strip() if os.path.exists(path) else None  # noqa: SIM115
    if not found:
        raise _fail("auto", "RAY_ADDRESS is not set and no cluster was started on this machine")
    return found


def split_host_port(hostport: str, address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → ``(host, port)``; ConfigError if malformed."""
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"executor.address: {address!r} is not an address; expected 'HOST:PORT' (e.g. "
            "'10.0.0.5:6379'), 'ray://HOST:10001' or 'auto'; or leave it out to start a local "
            "Ray instance"
        )
    return host, int(port)


def tcp_probe(host: str, port: int, address: str, timeout: float = TCP_TIMEOUT_S) -> None:
    """ConfigError unless a TCP connection to ``host:port`` opens within ``timeout``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except TimeoutError:
        raise _fail(address, f"no answer from {host}:{port} within {timeout:g} s") from None
    except OSError as exc:
        raise _fail(address, f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None


def protocol_probe(hostport: str, kind: str, address: str, timeout: float) -> None:
    """ConfigError unless a Ray GCS (``kind='gcs'``) or Ray Client server (``'client'``)
    answers at ``hostport`` within ``timeout`` seconds (checked in a subprocess)."""
    cmd = [sys.executable, "-c", _PROBE, hostport, kind, f"{timeout:g}"]
    try:
        run = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        server = "GCS" if kind == "gcs" else "Client server"
        why = f"{hostport} accepts connections but no Ray {server} answered within {timeout:g} s"
        raise _fail(address, why) from None
    if run.returncode != 0:
        lines = [ln for ln in run.stderr.splitlines() if ln.startswith("PROBE: ")]
        why = lines[-1][len("PROBE: ") :] if lines else f"exit code {run.returncode}"
        raise _fail(address, f"{hostport} does not answer as a Ray cluster: {why[:200]}")


def check_ray_address(address: str, *, timeout: float = PROTOCOL_TIMEOUT_S) -> None:
    """Raise ConfigError (within ``TCP_TIMEOUT_S + timeout`` s) unless a Ray cluster answers
    at ``address`` (``host:port``, ``ray://host:port`` or ``auto``; ``local`` passes)."""
    if address == "local":
        return
    target = resolve_auto() if address == "auto" else address
    client = target.startswith("ray://")
    hostport = target[len("ray://") :] if client else target
    if client and importlib.util.find_spec("grpc") is None:
        raise ConfigError(
            f"executor.address: {address!r} is a Ray Client address, which needs the Ray "
            f"Client (pip install 'ray[client]'); or {HOW_TO_START}"
        )
    host, port = split_host_port(hostport, address)
    host = _loopback_to_node_ip(host)
    tcp_probe(host, port, address)
    bracketed = f"[{host}]" if ":" in host else host
    protocol_probe(f"{bracketed}:{port}", "client" if client else "gcs", address, timeout)


def _loopback_to_node_ip(host: str) -> str:
    """Ray binds to the node IP, and maps ``localhost``/``127.0.0.1`` to it: so do we."""
    if host not in ("localhost", "127.0.0.1"):
        return host
    try:
        from ray._private.services import resolve_ip_for_localhost

        return resolve_ip_for_localhost(host)
    except Exception:
        return host
