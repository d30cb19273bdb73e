"""Measurements as JSON lines, appended as each cell finishes, so a killed run resumes.

A row is keyed by ``(backend, scenario, length, rep)``. It counts as done only if it has no
``error`` and its ``fingerprint`` is the current run's (same engine settings, same workload);
the last row of a key wins. Engine-level facts (KV bytes per token, startup time) go in the
same file as rows with ``"type": "engine"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from mesa_vllm.evaluation.store import append_rows, read_rows

__all__ = ["BenchStore", "read_rows", "row_key", "append_rows"]


def row_key(row: dict) -> tuple[str, str, int, int]:
    return (str(row["backend"]), str(row["scenario"]), int(row["length"]), int(row["rep"]))


def _same_settings(row: dict, fingerprints: dict[str, str] | None) -> bool:
    """Whether ``row`` was measured with the current settings of its kind (``oracle`` rows
    against the oracle's fingerprint, engine rows against vLLM's); ``None`` takes every row."""
    if fingerprints is None:
        return True
    kind = "oracle" if row.get("backend") == "oracle" else "vllm"
    return row.get("fingerprint") == fingerprints.get(kind)


class BenchStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        return read_rows(self.path)

    def cell_rows(self, fingerprints: dict[str, str] | None = None) -> list[dict]:
        """The latest measurement row of each key (``type == "cell"``). With ``fingerprints``
        (backend kind -> fingerprint; kinds ``vllm`` and ``oracle``), rows of other settings
        are left out."""
        latest: dict[tuple, dict] = {}
        for row in self.rows():
            if row.get("type") != "cell":
                continue
            if not _same_settings(row, fingerprints):
                continue
            try:
                latest[row_key(row)] = row
            except (KeyError, TypeError, ValueError):
                continue
        return list(latest.values())

    def done_keys(self, fingerprints: dict[str, str]) -> set[tuple[str, str, int, int]]:
        return {row_key(r) for r in self.cell_rows(fingerprints) if not r.get("error")}

    def engine_rows(self, fingerprints: dict[str, str] | None = None) -> list[dict]:
        out = []
        for row in self.rows():
            if row.get("type") != "engine":
                continue
            if not _same_settings(row, fingerprints):
                continue
            out.append(row)
        return out

    def latest_fingerprints(self) -> dict[str, str]:
        """Fingerprints (kind -> fingerprint) of the most recent rows of each kind: the settings
        of the last run, for a report asked for without that run's flags."""
        out: dict[str, str] = {}
        for row in self.rows():
            if row.get("type") in ("cell", "engine") and row.get("fingerprint"):
                out["oracle" if row.get("backend") == "oracle" else "vllm"] = row["fingerprint"]
        return out

    def append(self, rows: Iterable[dict]) -> None:
        append_rows(self.path, rows)
