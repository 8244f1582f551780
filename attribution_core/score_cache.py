"""Finished method outputs shared across output directories (the ``score_cache`` option).

A finished ``OUT/<label>/`` is reused by a later run into the *same* ``OUT`` only: its identity
names the query file by path (``bench`` copies a suite's queries into each output directory).
With ``score_cache: DIR`` every finished output is also copied to ``DIR/<key>/``, where ``key``
hashes the identity with the queries named by their content instead (:func:`portable_identity`:
method, task, target, model bytes, query data, dtype, precision, top-k); an output found
finished in its own directory is copied there too. A method whose key is there is restored
into ``OUT/<label>/`` instead of being scored. So ``bench`` on several suites that share a base
model and queries (single-model suites at several removal sizes and the distributional suite on
the same model) scores every method once.

Layout of an entry: the output's files (``scores.npy`` or ``topk.npz``) and its
``manifest.json`` with ``portable_identity`` added. A restored manifest is the cached one with
this run's ``identity`` and ``restored_from`` (the entry); its timings are those of the run that
scored the method. Entries are written to a temporary directory and renamed into place; an entry
whose files no longer match their recorded size and hash is ignored (the method is scored again).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attribution_core.gradient_cache import data_fingerprint
from attribution_core.integrity import check_files
from attribution_core.interfaces import Batch
from attribution_core.outputs import Scores, finished
from attribution_core.storage import atomic_write, atomic_write_json


def portable_identity(identity: dict[str, Any], queries_fingerprint: str) -> dict[str, Any]:
    """``identity`` with its ``queries`` entry replaced by the queries' content fingerprint."""
    return json.loads(
        json.dumps({**identity, "queries": {"fingerprint": queries_fingerprint}}, default=str)
    )


def cache_key(portable: dict[str, Any]) -> str:
    """The entry name of ``portable`` (24 hex digits of its SHA-256)."""
    text = json.dumps(portable, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ScoreCache:
    """The score cache of one run: ``root`` (None: off) and the fingerprint of the run's
    queries (hashed once per run, and only when the cache is on)."""

    root: Path | None
    queries_fingerprint: str = ""

    @classmethod
    def at(cls, root: str | None, queries: Batch) -> ScoreCache:
        """The cache under the config's ``score_cache`` (None: off)."""
        if root is None:
            return cls(None)
        return cls(Path(root), data_fingerprint(queries))

    def reused(
        self, directory: Path, identity: dict[str, Any], topk: int | None
    ) -> tuple[Scores, dict[str, Any]] | None:
        """The finished output in ``directory`` (copied into the cache if it is not there yet),
        else one restored there from the cache."""
        if done := finished(directory, identity, topk):
            self.store(identity, directory)
            return done
        if self.root is not None and self.restore(identity, directory):
            return finished(directory, identity, topk)
        return None

    def restore(self, identity: dict[str, Any], directory: Path) -> bool:
        """Copy the entry of ``identity`` into ``directory`` under ``identity``; False if there
        is no intact entry."""
        portable = portable_identity(identity, self.queries_fingerprint)
        saved = self._entry(portable)
        if saved is None:
            return False
        src = self.root / cache_key(portable)  # type: ignore[operator]
        directory.mkdir(parents=True, exist_ok=True)
        for name in saved["files"]:
            with (src / name).open("rb") as f:
                atomic_write(directory / name, lambda out, f=f: shutil.copyfileobj(f, out))
        manifest = {k: v for k, v in saved.items() if k != "portable_identity"}
        atomic_write_json(
            directory / "manifest.json",
            {**manifest, "identity": identity, "restored_from": str(src)},
        )
        return True

    def store(self, identity: dict[str, Any], directory: Path) -> None:
        """Copy the finished output in ``directory`` into the cache (an intact entry is kept)."""
        if self.root is None:
            return
        portable = portable_identity(identity, self.queries_fingerprint)
        if self._entry(portable) is not None:
            return
        manifest = json.loads((directory / "manifest.json").read_text())
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            for name in manifest.get("files", {}):
                shutil.copyfile(directory / name, tmp / name)
            atomic_write_json(tmp / "manifest.json", {**manifest, "portable_identity": portable})
            dst = self.root / cache_key(portable)
            shutil.rmtree(dst, ignore_errors=True)  # a damaged entry (an intact one returned above)
            os.replace(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _entry(self, portable: dict[str, Any]) -> dict[str, Any] | None:
        """The intact entry's manifest, or None."""
        if self.root is None:
            return None
        src = self.root / cache_key(portable)
        try:
            saved = json.loads((src / "manifest.json").read_text())
        except (ValueError, OSError):
            return None
        if saved.get("portable_identity") != portable or not saved.get("files"):
            return None
        if check_files(src, saved["files"], what="the score cache's manifest"):
            return None
        return saved
