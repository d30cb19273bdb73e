"""Results as JSON lines, one per sample, appended as they are scored (an interrupted run resumes).

A row is keyed by ``(task, method, length, index)``. The last row of a key wins; a row with an
``error`` does not count as done (it is retried on the next run). Each row carries the prompt's
fingerprint (``prompt_sha``): a row whose prompt no longer matches what the task builds today
(the generator changed) is ignored and the sample is run again.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterable
from pathlib import Path

RESULTS_FILE = "results.jsonl"
RUNS_FILE = "runs.jsonl"


def prompt_sha(token_ids: list[int]) -> str:
    return hashlib.sha1(array("I", token_ids).tobytes()).hexdigest()[:16]


def row_key(row: dict) -> tuple[str, str, int, int]:
    return (row["task"], row["method"], int(row["length"]), int(row["index"]))


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Every row of a results file, skipping a torn last line (from a killed run)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_rows(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows, one JSON object per line, flushed and synced. A torn last line (a writer
    killed mid-line) is closed first, so the new rows start on a line of their own."""
    rows = list(rows)
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with path.open("a") as f:
        if torn:
            f.write("\n")
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def latest_rows(rows: Iterable[dict]) -> dict[tuple, dict]:
    """The last row of each key."""
    out: dict[tuple, dict] = {}
    for row in rows:
        try:
            out[row_key(row)] = row
        except (KeyError, TypeError, ValueError):
            continue
    return out


class ResultStore:
    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.path = self.dir / RESULTS_FILE
        self.rows = latest_rows(read_rows(self.path))

    def done(self, key: tuple, sha: str | None = None) -> bool:
        row = self.rows.get(key)
        if row is None or row.get("error"):
            return False
        return sha is None or row.get("prompt_sha") == sha

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        append_rows(self.path, rows)
        for row in rows:
            self.rows[row_key(row)] = row

    def log_run(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / RUNS_FILE).open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
