"""The evaluation grid: tasks x methods x lengths x samples, declared once.

A *cell* is one ``(task, method, length)``; it has ``samples[task]`` samples, indexed ``0..n-1``.
Sample ``i`` of a task at a length is the same prompt for every method (seed ``seed + i``; the
needle depth ``depth_for(task, seed, i)``), so methods are compared on identical prompts. Depths
follow a golden-ratio sequence from a seeded random start: random-looking, but every prefix of
the samples covers ``[0, 1]`` evenly, so a run capped at a few samples still spreads its needles,
and sample ``i`` does not depend on how many samples are asked for (a run can be extended later).

Lengths are cell budgets: prompt + generated tokens fit in ``L``, so a prompt is
``L - max_new_tokens(task)`` tokens and a length of ``T`` or less never goes past the trained
length, generation included.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from mesa_vllm.evaluation.methods import Method, parse_method
from mesa_vllm.tasks.registry import TASKS, get_task

GOLDEN = 0.6180339887498949
ALL_TASKS = list(TASKS)

# The issue #4 grid (README, "Long-context quality").
ISSUE4_LENGTHS = [2048, 4096, 8192, 16384, 32768, 65536]
PRESETS: dict[str, dict] = {
    # Minutes on 2 cores: proves the pipeline end to end.
    "smoke": {
        "tasks": ["passkey", "niah_single"],
        "methods": ["origin", "mesa"],
        "lengths": [4096, 12288],
        "samples": {"*": 4},
    },
    # The comparison of issue #4: every task, the four methods with matched factors / defaults.
    "issue4": {
        "tasks": ALL_TASKS,
        "methods": ["origin", "yarn", "ntk", "mesa"],
        "lengths": ISSUE4_LENGTHS,
        "samples": {"*": 20, "ppl": 6},
    },
    # The mesa parameter sweep (passkey + multi-key needle, past T only), around the defaults
    # (R = T/2, the smallest E that covers the length): the window from T/8 to 5T/8 with E
    # chosen for it, and E from the smallest feasible up with the default window. With
    # R = T/2 and T = 8192, E >= 5 at 16k, 9 at 32k and 17 at 64k; infeasible points are
    # reported as such.
    "sweep": {
        "tasks": ["passkey", "niah_multikey"],
        "methods": [
            "mesa:R=1024", "mesa:R=2048", "mesa:R=3072", "mesa:R=5120",
            "mesa:E=5", "mesa:E=8", "mesa:E=9", "mesa:E=12", "mesa:E=17", "mesa:E=24",
            "mesa:log_n=false", "mesa:C=4096", "mesa:stair=linear",
        ],
        "lengths": [16384, 32768, 65536],
        "samples": {"*": 10},
    },
}


def parse_length(text: str | int) -> int:
    """``"16k"`` -> 16384, ``"12288"`` -> 12288 (``k`` = 1024)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", str(text))
    if not match:
        raise ValueError(f"cannot read the length {text!r} (use 16384 or 16k)")
    value = float(match.group(1)) * (1024 if match.group(2) else 1)
    if value != int(value) or value < 16:
        raise ValueError(f"length {text!r} must be a whole number of tokens >= 16")
    return int(value)


def format_length(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def parse_samples(text: str | int | dict) -> dict[str, int]:
    """``"20"`` -> ``{"*": 20}``; ``"passkey=20,ppl=6"`` -> per task (``*`` = every other)."""
    if isinstance(text, dict):
        return {k: int(v) for k, v in text.items()}
    if isinstance(text, int):
        return {"*": text}
    out: dict[str, int] = {}
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            key, value = "*", key
        key = key.strip()
        if key != "*" and key not in TASKS:
            raise ValueError(f"unknown task {key!r} in --samples; tasks: {', '.join(TASKS)}")
        out[key] = int(value)
    return out


def parse_caps(values: list[str] | str | None) -> list[tuple[dict, int]]:
    """Per-cell sample caps: ``origin@64k=5``, ``ppl@32k=3``, ``passkey@yarn@64k=8``.

    A selector is ``@``-joined parts, each a length (``64k``), a task name, or a method (its full
    label, or a kind such as ``yarn`` that matches every ``yarn:...`` too). A cell takes the
    smallest cap whose parts all match it.
    """
    if not values:
        return []
    if isinstance(values, str):
        values = [values]
    caps = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            selector, eq, number = item.rpartition("=")
            if not eq or not selector:
                raise ValueError(f"cannot read the cap {item!r} (use e.g. origin@64k=5)")
            rule: dict = {}
            for part in selector.split("@"):
                part = part.strip()
                try:
                    rule["length"] = parse_length(part)
                    continue
                except ValueError:
                    pass
                if part in TASKS:
                    rule["task"] = part
                else:
                    rule["method"] = part
            caps.append((rule, int(number)))
    return caps


def _cap_matches(rule: dict, task: str, method: Method, length: int) -> bool:
    if "length" in rule and rule["length"] != length:
        return False
    if "task" in rule and rule["task"] != task:
        return False
    if "method" in rule and rule["method"] not in (method.label, method.kind):
        return False
    return True


def depth_for(task: str, seed: int, index: int) -> float:
    """Needle depth of sample ``index``: ``frac(u + index * golden)``, ``u`` drawn from the seed."""
    start = random.Random(f"depth:{task}:{seed}").random()
    return (start + index * GOLDEN) % 1.0


@dataclass(frozen=True)
class Cell:
    task: str
    method: Method
    length: int
    samples: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.task, self.method.label, self.length)


@dataclass
class Grid:
    tasks: list[str]
    methods: list[Method]
    lengths: list[int]
    samples: dict[str, int] = field(default_factory=lambda: {"*": 20})
    seed: int = 0
    max_samples_per_cell: int | None = None
    caps: list[tuple[dict, int]] = field(default_factory=list)

    def __post_init__(self):
        for task in self.tasks:
            get_task(task)
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"a method is listed twice: {labels}")

    @classmethod
    def from_options(cls, preset: str | None = None, tasks=None, methods=None, lengths=None,
                     samples=None, seed: int = 0, max_samples_per_cell: int | None = None,
                     caps=None) -> Grid:
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        base = dict(PRESETS[preset or "smoke"])
        tasks = list(tasks) if tasks else list(base["tasks"])
        methods = [m if isinstance(m, Method) else parse_method(m)
                   for m in (methods or base["methods"])]
        lengths = [parse_length(x) for x in (lengths or base["lengths"])]
        samples = parse_samples(samples) if samples is not None else dict(base["samples"])
        if caps is None:
            caps = base.get("caps")
        if not caps or isinstance(caps, str) or isinstance(caps[0], str):
            caps = parse_caps(caps)
        return cls(tasks, methods, sorted(set(lengths)), samples, seed, max_samples_per_cell,
                   caps)

    def samples_for(self, task: str) -> int:
        n = self.samples.get(task, self.samples.get("*", 20))
        if self.max_samples_per_cell is not None:
            n = min(n, self.max_samples_per_cell)
        return n

    def samples_for_cell(self, task: str, method: Method, length: int) -> int:
        n = self.samples_for(task)
        for rule, cap in self.caps:
            if _cap_matches(rule, task, method, length):
                n = min(n, cap)
        return n

    def cells(self) -> list[Cell]:
        return [Cell(t, m, L, self.samples_for_cell(t, m, L))
                for L in self.lengths for m in self.methods for t in self.tasks]

    def as_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "methods": [m.label for m in self.methods],
            "lengths": self.lengths,
            "samples": {t: self.samples_for(t) for t in self.tasks},
            "caps": [[rule, n] for rule, n in self.caps],
            "seed": self.seed,
        }
