"""Peak memory of a process tree (this process and every descendant: vLLM's EngineCore and
worker), per measured cell.

Two views, both reported:

- ``peak_rss``: the largest *sum* of RSS over the tree, sampled every ``interval`` seconds by a
  background thread (a lower bound of the true peak: a spike shorter than the interval can
  be missed);
- ``hwm``: each process's own kernel high-water mark (``VmHWM``), reset at the start of the
  cell through ``/proc/PID/clear_refs`` (Linux >= 4.0) and read at its end. Their sum is an
  upper bound of the tree's peak (the processes need not peak at once); the largest one is
  normally vLLM's worker, which holds the model, the KV cache and the attention scratch.

Summing RSS counts pages shared between processes (e.g. shared memory for IPC) once per
process; the worker's own figure has no such double count.
"""

from __future__ import annotations

import os
import threading
import time

try:
    import psutil
except ImportError:  # pragma: no cover - vLLM depends on psutil
    psutil = None


def _tree(root: int) -> list:
    try:
        proc = psutil.Process(root)
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _rss(proc) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _name(proc) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


class TreeMemory:
    """Background sampler of a process tree's memory; one ``window()`` per measured cell."""

    def __init__(self, root: int | None = None, interval: float = 0.05):
        self.root = os.getpid() if root is None else root
        self.interval = interval
        self._lock = threading.Lock()
        self._peak = 0
        self._peak_by_pid: dict[int, int] = {}
        self._current = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- sampling -------------------------------------------------------------------------
    def sample(self) -> int:
        procs = _tree(self.root)
        values = {p.pid: _rss(p) for p in procs}
        total = sum(values.values())
        with self._lock:
            self._current = total
            self._peak = max(self._peak, total)
            for pid, v in values.items():
                self._peak_by_pid[pid] = max(self._peak_by_pid.get(pid, 0), v)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> TreeMemory:
        if psutil is None:
            return self
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    # -- one cell -------------------------------------------------------------------------
    def begin(self) -> dict:
        """Reset the peaks; returns the tree's memory now (the idle baseline of the cell)."""
        if psutil is None:
            return {}
        procs = _tree(self.root)
        hwm_reset = all(_reset_hwm(p.pid) for p in procs) if procs else False
        self._hwm_reset = hwm_reset
        current = self.sample()
        with self._lock:
            self._peak = current
            self._peak_by_pid = {}
        self.sample()
        return {"idle_rss": current, "hwm_reset": hwm_reset}

    def end(self) -> dict:
        """Peaks since :meth:`begin`, in bytes."""
        if psutil is None:
            return {}
        self.sample()
        procs = _tree(self.root)
        hwm = {}
        for p in procs:
            kib = _status_kib(p.pid, "VmHWM")
            if kib is not None:
                hwm[p.pid] = kib * 1024
        with self._lock:
            peak = self._peak
            by_pid = dict(self._peak_by_pid)
        names = {p.pid: _name(p) for p in procs}
        largest = max(hwm, key=hwm.get) if hwm else None
        return {
            "peak_rss": peak,
            "hwm_sum": sum(hwm.values()) if getattr(self, "_hwm_reset", False) else None,
            "hwm_max": hwm[largest] if largest is not None and getattr(self, "_hwm_reset", False)
            else None,
            "hwm_max_process": names.get(largest),
            "peak_rss_by_process": {f"{names.get(pid, '?')}:{pid}": v for pid, v in by_pid.items()},
        }

    def __enter__(self) -> TreeMemory:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_a_moment(seconds: float = 0.2) -> None:
    """Let the sampler catch the tree after a step (used between cells)."""
    time.sleep(seconds)
