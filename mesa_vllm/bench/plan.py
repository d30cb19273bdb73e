"""What a run will measure, in which order, and how long it should take (engine-free).

A run is a list of **groups**, each measured by one fresh process: one vLLM engine per
(backend, length), or one dense oracle per length. Groups go shortest length first, and at
each length mesa and the default backend back to back, so every length that finishes has
both sides of its ratio. A group holds its **cells**: (scenario, repetition) pairs, in
repetition order (single request, then the batch of 4, then the next repetition).

The cost model (seconds) is deliberately simple::

    prefill = n * (per_token * L + per_pair[backend] * pairs(L))
    decode  = steps * (per_step + per_ctx[backend] * n * L)

where ``pairs(L)`` counts the query-key pairs attention computes for one prompt: ``L^2 / 2``
for the default backend (and mesa at ``L <= T``), and for mesa past ``T`` the first chunk and
the first middle chunk densely, each later middle token ``F`` + its own chunk, each stair token
every key (``~ L * (F + C/2) + R * L``, linear in ``L``). The constants are rough 2-core CPU
figures; a run re-scales them by what it has measured so far (:meth:`CostModel.calibrated`),
per backend, so ``--plan`` on an output that already holds results uses that machine's speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from mesa_vllm.bench.config import SCENARIOS, BenchConfig, ModelShape, format_length


# --------------------------------------------------------------------------------------
# Attention work
def dense_pairs(length: int) -> int:
    return length * (length + 1) // 2


def mesa_pairs(length: int, geometry) -> int:
    """Query-key pairs of one mesa prefill of ``length`` tokens (``geometry``: a MesaGeometry
    or anything with ``T, F, C, R, E`` and the rule's ``final_start`` / ``plain_end``)."""
    L = int(length)
    if geometry is None or L <= geometry.T:
        return dense_pairs(L)
    F, C = geometry.F, geometry.C
    b = geometry.final_start(L)
    plain_end = geometry.plain_end(L)
    total = dense_pairs(plain_end)  # rows [0, plain_end): p + 1 keys
    # middle rows [plain_end, b): F keys of the first chunk + (p - s + 1) of their own chunk
    p = plain_end
    while p < b:
        s = F + C * ((p - F) // C)
        end = min(b, s + C)
        n = end - p
        first_offset = p - s  # (p - s + 1) for the first row of this run
        total += n * F + n * (first_offset + 1) + n * (n - 1) // 2
        p = end
    # stair rows [b, L): every key [0, p]
    total += dense_pairs(L) - dense_pairs(b)
    return total


def geometry_for(config: BenchConfig, shape: ModelShape):
    """The geometry the mesa backend will resolve (same function the engine uses)."""
    from mesa_vllm.params import resolve_geometry

    return resolve_geometry(shape.trained_len, config.resolved_max_model_len(), config.mesa)


# --------------------------------------------------------------------------------------
# Cost model
@dataclass(frozen=True)
class CostModel:
    # Rough quiet 2-core figures (SmolLM2-135M, bf16, eager), extrapolated from smoke runs on
    # a loaded machine; every run re-scales them by what it measures.
    engine_start: float = 60.0  # build one vLLM engine (eager)
    compile_start: float = 240.0  # extra for a compiled engine (first time; cached after)
    oracle_start: float = 15.0
    per_token: float = 1.2e-3  # linear layers, norms, sampling: seconds per prompt token
    per_pair: dict = field(default_factory=lambda: {
        "default": 1.0e-7, "mesa": 1.5e-7, "oracle": 4.0e-4})
    # one decode step, fixed part (30 layers of small ops)
    per_step: dict = field(default_factory=lambda: {"default": 0.025, "mesa": 0.03, "oracle": 0.5})
    per_ctx: dict = field(default_factory=lambda: {
        "default": 1.2e-6, "mesa": 1.5e-6, "oracle": 2.0e-3})  # per step, sequence, context token
    oracle_per_token: float = 0.06
    scale: dict = field(default_factory=lambda: {"default": 1.0, "mesa": 1.0, "oracle": 1.0})

    def pairs(self, backend: str, length: int, geometry) -> int:
        if backend in ("mesa", "oracle"):
            return mesa_pairs(length, geometry)
        return dense_pairs(length)

    def prefill_seconds(self, backend: str, length: int, n: int, geometry) -> float:
        per_token = self.oracle_per_token if backend == "oracle" else self.per_token
        return n * (per_token * length + self.per_pair[backend] * self.pairs(backend, length, geometry))

    def decode_seconds(self, backend: str, length: int, n: int, steps: int) -> float:
        return steps * (self.per_step[backend] + self.per_ctx[backend] * n * length)

    def cell_seconds(self, backend: str, length: int, scenario: str, config: BenchConfig,
                     geometry) -> float:
        """Unscaled estimate of one cell."""
        n = SCENARIOS[scenario]
        if backend == "oracle":
            steps = config.oracle_decode_tokens
        else:
            steps = config.max_tokens(length, n) - 1
        return self.prefill_seconds(backend, length, n, geometry) + \
            self.decode_seconds(backend, length, n, steps)

    def startup_seconds(self, backend: str, config: BenchConfig, geometry) -> float:
        if backend == "oracle":
            return self.oracle_start
        start = self.engine_start + (self.compile_start if config.compile else 0.0)
        warm = self.prefill_seconds(backend, config.warmup_tokens, 1, geometry) + \
            self.decode_seconds(backend, config.warmup_tokens, 1, 4)
        return start + warm

    def calibrated(self, rows: list[dict]) -> CostModel:
        """Re-scale each backend by measured / estimated seconds over finished cells (rows with
        ``wall_s`` and an ``estimate_s`` of the unscaled model). A backend with no rows takes the
        mean scale of the others."""
        sums: dict[str, list[float]] = {}
        for row in rows:
            if row.get("error") or not row.get("wall_s") or not row.get("estimate_s"):
                continue
            s = sums.setdefault(row["backend"], [0.0, 0.0])
            s[0] += float(row["wall_s"])
            s[1] += float(row["estimate_s"])
        scales = {b: s[0] / s[1] for b, s in sums.items() if s[1] > 0 and s[0] > 0}
        if not scales:
            return self
        mean = sum(scales.values()) / len(scales)
        return replace(self, scale={b: scales.get(b, mean) for b in ("default", "mesa", "oracle")})


# --------------------------------------------------------------------------------------
# Groups
@dataclass
class Group:
    backend: str  # "mesa", "default" or "oracle"
    length: int
    cells: list[tuple[str, int]]  # (scenario, rep) still to measure
    done: int = 0  # cells already in the results file
    estimate_s: float = 0.0  # scaled seconds for the pending cells, startup included
    cell_estimates: dict = field(default_factory=dict)  # (scenario, rep) -> unscaled seconds
    fits: bool = True

    @property
    def name(self) -> str:
        return f"{self.backend}@{format_length(self.length)}"


def all_cells(config: BenchConfig) -> list[tuple[str, str, int, int]]:
    """Every (backend, scenario, length, rep) of the run, in run order."""
    out = []
    for group in build_groups(config, done=set()):
        out.extend((group.backend, s, group.length, r) for s, r in group.cells)
    return out


def build_groups(config: BenchConfig, done: set[tuple[str, str, int, int]],
                 cost: CostModel | None = None, shape: ModelShape | None = None,
                 geometry=None, budget_s: float | None = None,
                 include_oracle: bool = True) -> list[Group]:
    """Groups in run order with their pending cells; ``done`` holds finished
    ``(backend, scenario, length, rep)`` keys. With ``cost``, each group gets an estimate;
    with ``budget_s`` as well, groups that would end past the budget are marked
    ``fits=False`` (later, smaller groups, e.g. the oracle's, may still fit)."""
    groups: list[Group] = []
    for length in config.vllm_lengths():
        for backend in config.backends:
            cells = []
            n_done = 0
            for rep in range(config.reps_for(length)):
                for scenario in config.scenarios_for(length):
                    if (backend, scenario, length, rep) in done:
                        n_done += 1
                    else:
                        cells.append((scenario, rep))
            groups.append(Group(backend, length, cells, done=n_done))
    if include_oracle:
        for length in sorted(config.oracle_lengths):
            cells, n_done = [], 0
            for rep in range(config.oracle_reps):
                if ("oracle", "single", length, rep) in done:
                    n_done += 1
                else:
                    cells.append(("single", rep))
            groups.append(Group("oracle", length, cells, done=n_done))
    if cost is not None:
        used = 0.0
        for group in groups:
            if not group.cells:
                continue
            est = cost.startup_seconds(group.backend, config, geometry)
            for scenario, rep in group.cells:
                cell = cost.cell_seconds(group.backend, group.length, scenario, config, geometry)
                group.cell_estimates[(scenario, rep)] = cell
                est += cell
            group.estimate_s = est * cost.scale.get(group.backend, 1.0)
            if budget_s is not None and used + group.estimate_s > budget_s:
                group.fits = False
            else:
                used += group.estimate_s
    return groups


def format_seconds(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = float(s)
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def format_plan(groups: list[Group], budget_s: float | None = None, cost: CostModel | None = None
                ) -> str:
    lines = [f"{'group':<16}{'cells':>6}{'done':>6}{'estimate':>10}{'cumulative':>12}  status"]
    cumulative = 0.0
    skipped = 0.0
    for group in groups:
        if not group.cells:
            status = "done"
        elif group.fits:
            cumulative += group.estimate_s
            status = "run"
        else:
            skipped += group.estimate_s
            status = "over budget: skipped"
        lines.append(f"{group.name:<16}{len(group.cells):>6}{group.done:>6}"
                     f"{format_seconds(group.estimate_s) if group.cells else '-':>10}"
                     f"{format_seconds(cumulative):>12}  {status}")
    lines.append(f"estimated run time: {format_seconds(cumulative)}"
                 + (f" (budget {format_seconds(budget_s)})" if budget_s else "")
                 + (f"; {format_seconds(skipped)} of work left out by the budget" if skipped
                    else ""))
    if cost is not None:
        scales = ", ".join(f"{k} x{v:.2f}" for k, v in sorted(cost.scale.items()))
        lines.append(f"cost model scale (measured / estimated so far): {scales}")
    return "\n".join(lines)
