"""File integrity: sha256 records in ``suite.json`` and manifests, checked before use.

A suite's ``suite.json`` holds ``files: {relative path: {size, sha256}}`` for every array file
of the suite (``runs/`` excluded: they are build intermediates). ``bench`` verifies a suite
before reading it: sizes always, hashes once per file — a verified hash is remembered in a
cache *outside* the suite (``$ATTRIBUTION_HASH_CACHE``, default
``~/.cache/attribution/hashes.json``) keyed by absolute path, size and mtime, so an unchanged
file is not re-read. ``attribution suite verify SUITE`` re-hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from attribution_core.errors import DataError
from attribution_core.storage import atomic_write_json

SKIPPED = ("suite.json", "runs")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file (and remembers it in the hash cache)."""
    digest = sha256_file(path)
    _remember(Path(path), digest)
    return {"size": Path(path).stat().st_size, "sha256": digest}


def suite_files(root: str | Path) -> list[str]:
    """Relative paths of a suite's data files (hidden files, ``suite.json`` and ``runs/`` excluded)."""
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if (
            p.is_file()
            and rel.parts[0] not in SKIPPED
            and not any(part.startswith(".") for part in rel.parts)
        ):
            out.append(rel.as_posix())
    return out


def hash_suite(root: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, sha256}}`` of every data file of the suite at ``root``."""
    return {rel: file_record(Path(root) / rel) for rel in suite_files(root)}


def check_files(
    root: str | Path, files: dict[str, dict[str, Any]], *, full: bool = False, what: str = "suite"
) -> list[str]:
    """Problems of ``files`` under ``root``: missing, size differs, or hash differs.

    Args:
        root: the directory the relative paths are in.
        files: ``{relative path: {size, sha256}}`` as recorded.
        full: re-hash every file (ignore the hash cache).
        what: how messages name the directory.

    Returns:
        One line per bad file (empty: all good).
    """
    root = Path(root)
    problems = []
    for rel, rec in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{str(p)!r} is missing")
            continue
        size = p.stat().st_size
        if size != rec.get("size"):
            kind = "truncated" if size < rec.get("size", 0) else "larger than recorded"
            problems.append(
                f"{str(p)!r} is {kind} ({size} bytes, {what} records {rec.get('size')})"
            )
            continue
        if not full and _cached(p) == rec.get("sha256"):
            continue
        digest = sha256_file(p)
        _remember(p, digest)
        if digest != rec.get("sha256"):
            problems.append(
                f"{str(p)!r} was modified (sha256 {digest[:12]}… ≠ recorded {str(rec.get('sha256'))[:12]}…)"
            )
    return problems


def verify_suite(root: str | Path, meta: dict[str, Any], *, key: str = "evaluation.suite") -> None:
    """Refuse a suite whose files are not the ones ``suite.json`` records.

    Raises:
        DataError: no hashes recorded, or a file is missing, truncated or edited (named).
    """
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise DataError(
            f"{key}: suite {str(root)!r} records no file hashes (built before integrity "
            f"checks); check it and record them with `attribution suite verify {root} --write`"
        )
    problems = check_files(root, files)
    if problems:
        raise DataError(
            f"{key}: suite {str(root)!r} failed its integrity check: {'; '.join(problems)} — "
            f"restore the suite (e.g. `git checkout`/copy it again) or rebuild it with its "
            f"command: {meta.get('command', 'attribution suite build ...')}"
        )


def _meta(root: Path) -> dict[str, Any]:
    path = root / "suite.json"
    if not path.is_file():
        raise DataError(f"{str(root)!r} is not a suite (no suite.json); give a suite directory")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise DataError(f"{str(path)!r} is not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{str(path)!r}: expected a JSON object")
    return meta


def verify_suite_full(root: str | Path) -> int:
    """``attribution suite verify``: re-hash every recorded file (no cache) and report files the
    suite holds but does not record.

    Returns:
        The number of files verified.

    Raises:
        DataError: no hashes recorded, a file missing, truncated, edited, or unrecorded.
    """
    root = Path(root)
    meta = _meta(root)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        verify_suite(root, meta, key="suite verify")
    problems = check_files(root, files, full=True)
    problems += [f"{str(root / r)!r} is not recorded" for r in suite_files(root) if r not in files]
    if problems:
        raise DataError(f"suite verify: {str(root)!r} failed: {'; '.join(problems)}")
    return len(files)


def record_suite_hashes(root: str | Path) -> int:
    """``attribution suite verify --write``: record every data file's size and sha256 in
    ``suite.json`` (a migration for suites built before integrity checks).

    Returns:
        The number of files recorded.

    Raises:
        DataError: not a complete suite.
    """
    root = Path(root)
    meta = _meta(root)
    if meta.get("status") != "complete":
        raise DataError(
            f"suite verify --write: {str(root)!r} is incomplete; finish its build first"
        )
    meta["files"] = hash_suite(root)
    atomic_write_json(root / "suite.json", meta)
    return len(meta["files"])


# ---- the hash cache (outside every suite) --------------------------------------------------
def cache_path() -> Path:
    """``$ATTRIBUTION_HASH_CACHE`` or ``$XDG_CACHE_HOME/attribution/hashes.json``."""
    if env := os.environ.get("ATTRIBUTION_HASH_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "attribution" / "hashes.json"


def _stamp(p: Path) -> tuple[str, list[int]]:
    st = p.stat()
    return str(p.resolve()), [st.st_size, st.st_mtime_ns]


def _load_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached(p: Path) -> str | None:
    """The remembered sha256 of ``p`` if its size and mtime are unchanged since."""
    path, stamp = _stamp(p)
    entry = _load_cache().get(path)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry.get("sha256")
    return None


def _remember(p: Path, digest: str) -> None:
    """Record ``digest`` for ``p``'s current size and mtime; best effort (never fails)."""
    try:
        path, stamp = _stamp(p)
        cache = _load_cache()
        cache[path] = {"stamp": stamp, "sha256": digest}
        atomic_write_json(cache_path(), cache)
    except OSError:
        pass
