"""Results as JSON lines, one per sample, appended as they are scored (an interrupted run resumes).

A row is keyed by ``(task, method, length, index)``. The last row of a key wins; a row with an
``error`` does not count as done (it is retried on the next run). Each row carries the prompt's
fingerprint (``prompt_sha``): a row whose prompt no longer matches what the task builds today
(the generator changed) is ignored and the sample is run again. It also carries what its engine
was (``engine``: the mesa geometry, the rope factor, ...): a row made by a different engine than
the label resolves to today (a default changed) is stale, so the sample is run again, and the
report counts only a cell's newest engine (:func:`current_rows`).
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterable
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


def same_engine(row: dict, engine: dict) -> bool:
    """Whether ``row`` was made by an engine described by ``engine`` (rows that predate the
    ``engine`` field count as made by it)."""
    return "engine" not in row or _canon(row["engine"]) == _canon(engine)


def _canon(info) -> str:
    # Rows from before the stair shape was a parameter have no "stair": theirs was the step.
    if isinstance(info, dict) and isinstance(info.get("mesa"), dict):
        info = {**info, "mesa": {"stair": "step", **info["mesa"]}}
    return json.dumps(info, sort_keys=True)


def current_rows(rows: Iterable[dict], expected: Callable[[dict], dict | None] | None = None
                 ) -> tuple[list[dict], dict[tuple, int]]:
    """The rows to report, and how many rows of each (task, method, length) cell were left out as
    stale: made by an engine the label no longer resolves to (a default parameter changed and
    the cell was not run again yet). ``expected(row)`` gives the engine the row's label resolves
    to today, or None where that cannot be told; there, the cell's newest engine counts."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["task"], row["method"], int(row["length"])), []).append(row)
    kept: list[dict] = []
    stale: dict[tuple, int] = {}
    for cell, members in cells.items():
        want = expected(members[0]) if expected else None
        if want is None:
            want = max(members, key=lambda r: r.get("time") or "").get("engine")
        fresh = [r for r in members if "engine" not in r or _canon(r["engine"]) == _canon(want)]
        kept += fresh
        if len(fresh) < len(members):
            stale[cell] = len(members) - len(fresh)
    return kept, stale


class ResultStore:
    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.path = self.dir / RESULTS_FILE
        self.rows = latest_rows(read_rows(self.path))
        self._sample_index: tuple[int, dict] | None = None

    def done(self, key: tuple, sha: str | None = None, engine: dict | None = None) -> bool:
        """True when ``key`` has a scored row (for prompt ``sha`` and made by ``engine``, where
        given)."""
        row = self.rows.get(key)
        if row is None or row.get("error"):
            return False
        if engine is not None and not same_engine(row, engine):
            return False
        return sha is None or row.get("prompt_sha") == sha

    def twin(self, key: tuple, kind: str, engine: dict, model: str, seed: int) -> dict | None:
        """A scored local row of another label for the same sample (task, length, index, prompt
        seed) made by an identical engine (same kind, model and resolved parameters: e.g.
        ``mesa`` and the sweep point its defaults resolve to), whose output this label would
        repeat."""
        task, label, length, index = key
        for other in self._labels_by_sample().get((task, length, index), ()):
            row = self.rows[(task, other, length, index)]
            if other != label and not row.get("error") and row.get("seed") == seed \
                    and row.get("kind") == kind and row.get("backend") == "vllm" \
                    and row.get("model") == model and "engine" in row \
                    and same_engine(row, engine):
                return row
        return None

    def _labels_by_sample(self) -> dict[tuple, list[str]]:
        # The labels with a row per (task, length, index), so twin() does not scan every row for
        # every sample. Keys are never removed from self.rows (callers also add to it directly),
        # so a change in its size is what makes the index stale; rows are read live.
        if self._sample_index is None or self._sample_index[0] != len(self.rows):
            index: dict[tuple, list[str]] = {}
            for task, label, length, i in self.rows:
                index.setdefault((task, length, i), []).append(label)
            self._sample_index = (len(self.rows), index)
        return self._sample_index[1]

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        append_rows(self.path, rows)
        for row in rows:
            self.rows[row_key(row)] = row

    def log_run(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / RUNS_FILE).open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
