"""Run a grid: build the prompts, group the cells by engine, batch, score, append, resume.

Offline mode starts one vLLM engine per distinct :class:`~mesa_vllm.evaluation.methods.EngineConfig`
(one per method and length; methods whose engines coincide share it) and sends each task's
prompts through ``LLM.generate``: one prompt per call by default, or batches of up to
``batch_tokens`` prompt tokens. One at a time is the default because in bf16 vLLM's default CPU
attention is not batch-invariant: a prompt prefilled next to another one (a mixed prefill/decode
step) gets slightly different logits than alone, which flips near-tie greedy answers, so results
would depend on batch composition (and on where an interrupted run resumed). Sequential calls
cost little here: prefill is compute-bound on CPU; only decoding loses its batching. Prefix
caching is on: prompts are ordered by needle depth, deepest first, so the filler before a needle
is usually already cached from the previous prompt (exact for every method, mesa included: its
cache keys carry each block's Mesa role). Endpoint mode sends the same prompts to an
OpenAI-compatible server, ``concurrency`` at a time.

Every scored sample is appended to ``results.jsonl`` at once, so an interrupted run loses at most
the batch in flight and the next run skips what is done. Cells run in order of length, shortest
first; ``time_budget`` stops the run before a batch that would not finish in time (the estimate
is re-scaled by the measured speed as the run goes). A tqdm bar tracks estimated seconds of work,
so its ETA accounts for the long prompts still to come.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mesa_vllm.evaluation.cost import CostModel
from mesa_vllm.evaluation.grid import Grid, depth_for, format_length
from mesa_vllm.evaluation.methods import EngineConfig, Method, engine_config
from mesa_vllm.evaluation.store import (ResultStore, append_rows, prompt_sha, read_rows,
                                        row_key)
from mesa_vllm.tasks.base import Sample
from mesa_vllm.tasks.perplexity import perplexity, ppl_stats
from mesa_vllm.tasks.registry import get_task

ENDPOINT_KIND = "endpoint"


@dataclass
class ModelFacts:
    trained_len: int
    rope_parameters: dict
    kv_bytes_per_token: int  # default attention, bf16 K and V over all layers

    @classmethod
    def from_model_dir(cls, model: str, trained_len: int | None = None) -> ModelFacts:
        config = json.loads((Path(model) / "config.json").read_text())
        from types import SimpleNamespace

        from mesa_vllm.params import trained_length

        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if "rope_theta" in config and "rope_theta" not in rope:
            rope = {**rope, "rope_theta": config["rope_theta"]}
        T = trained_len or trained_length(SimpleNamespace(**{
            k: v for k, v in config.items() if k in (
                "max_position_embeddings", "rope_parameters", "rope_scaling",
                "original_max_position_embeddings")}))
        heads = config.get("num_attention_heads", 1)
        head_dim = config.get("head_dim") or config.get("hidden_size", 64 * heads) // heads
        kv_heads = config.get("num_key_value_heads", heads)
        per_token = config.get("num_hidden_layers", 1) * kv_heads * head_dim * 2 * 2
        return cls(int(T), dict(rope), int(per_token))


@dataclass
class RunOptions:
    out_dir: Path
    model: str | None = None
    tokenizer: str | None = None
    trained_len: int | None = None
    kv_cache_gib: float | None = None
    enforce_eager: bool = True
    prefix_caching: bool = True
    batch_tokens: int = 0  # 0: one prompt per LLM.generate call
    time_budget: float | None = None
    engine_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    # Endpoint mode: {"url", "model", "label", "prompt_mode", "concurrency", "api_key", "timeout"}
    endpoint: dict | None = None
    progress: bool = True
    calibrate_from: list[Path] = field(default_factory=list)  # more results folders for timing
    log: Callable[[str], None] = print


@dataclass
class Group:
    """Work for one engine: (task, length, index) -> the method labels that want it."""

    config: EngineConfig
    kind: str
    length: int
    methods: list[Method] = field(default_factory=list)
    items: dict[tuple[str, int], list[Method]] = field(default_factory=dict)


@dataclass
class PlanCell:
    task: str
    method: Method
    length: int
    planned: int
    done: int
    remaining: list[int]
    config: EngineConfig | None
    est_seconds: float = 0.0

    @property
    def infeasible(self) -> str | None:
        return self.config.infeasible if self.config else None


@dataclass
class Plan:
    cells: list[PlanCell]
    groups: list[Group]
    cost: CostModel
    trained_len: int

    @property
    def total_seconds(self) -> float:
        return sum(c.est_seconds for c in self.cells) + self.cost.engine_start * len(
            [g for g in self.groups if g.kind != ENDPOINT_KIND])


def _engine_kind(method: Method, config: EngineConfig) -> str:
    if method.kind == ENDPOINT_KIND:
        return ENDPOINT_KIND
    return "mesa" if config.llm_kwargs.get("attention_backend") == "mesa" else "dense"


def make_plan(grid: Grid, store: ResultStore, facts: ModelFacts, cost: CostModel,
              endpoint_label: str | None = None) -> Plan:
    """What is left to run, cell by cell, grouped by engine, with time estimates."""
    cells: list[PlanCell] = []
    groups: dict[str, Group] = {}
    for cell in grid.cells():
        method = cell.method
        if endpoint_label is not None:
            config = EngineConfig(cell.length, info={"endpoint": True})
        else:
            config = engine_config(method, cell.length, facts.trained_len, facts.rope_parameters)
        # A row made by another engine (a default parameter changed since) is not done.
        done = [i for i in range(cell.samples)
                if store.done((cell.task, method.label, cell.length, i), engine=config.info)]
        remaining = [i for i in range(cell.samples) if i not in set(done)]
        pc = PlanCell(cell.task, method, cell.length, cell.samples, len(done), remaining, config)
        cells.append(pc)
        if config.infeasible or not remaining:
            continue
        spec = get_task(cell.task)
        kind = _engine_kind(method, config)
        geometry = config.info.get("mesa")
        per = cost.sample_seconds("mesa" if kind == "mesa" else "dense", cell.length,
                                  spec.max_new_tokens, 0, geometry, facts.trained_len,
                                  logprobs=spec.kind == "logprobs")
        key = f"endpoint@{cell.length}" if endpoint_label is not None else config.key
        group = groups.setdefault(key, Group(config, kind, cell.length))
        if method not in group.methods:
            group.methods.append(method)
        new = 0
        for i in remaining:
            wanted = group.items.setdefault((cell.task, i), [])
            if not wanted:
                new += 1
            wanted.append(method)
        # A sample shared with an identical engine is run (and costed) once.
        pc.est_seconds = per * new
    ordered = sorted(groups.values(), key=lambda g: (g.length, [m.label for m in grid.methods]
                                                     .index(g.methods[0].label)))
    return Plan(cells, ordered, cost, facts.trained_len)


def format_plan(plan: Plan, grid: Grid, time_budget: float | None = None) -> str:
    """The grid as a table: per cell, samples done/planned and the estimated time left."""
    lines = []
    header = f"{'task':<16} {'method':<26}" + "".join(
        f"{format_length(L):>14}" for L in grid.lengths)
    lines.append(header)
    lines.append("-" * len(header))
    by_key = {(c.task, c.method.label, c.length): c for c in plan.cells}
    for task in grid.tasks:
        for method in grid.methods:
            row = f"{task:<16} {method.label:<26}"
            for L in grid.lengths:
                c = by_key[(task, method.label, L)]
                if c.infeasible:
                    text = "infeasible"
                elif not c.remaining:
                    text = f"{c.done}/{c.planned} done"
                elif c.config and c.config.info.get("same_as"):
                    text = f"{c.done}/{c.planned} ={c.config.info['same_as']}"
                else:
                    text = f"{c.done}/{c.planned} {_fmt_time(c.est_seconds)}"
                row += f"{text:>14}"
            lines.append(row)
    lines.append("")
    n_engines = len([g for g in plan.groups if g.kind != ENDPOINT_KIND])
    remaining = sum(len(c.remaining) for c in plan.cells if not c.infeasible)
    lines.append(
        f"left: {remaining} samples on {n_engines} engines; estimated {_fmt_time(plan.total_seconds)}"
        f" (engine start {plan.cost.engine_start:.0f} s each; speed scale dense x"
        f"{plan.cost.dense_scale:.2f}, mesa x{plan.cost.mesa_scale:.2f})")
    by_method: dict[str, float] = {}
    for c in plan.cells:
        by_method[c.method.label] = by_method.get(c.method.label, 0.0) + c.est_seconds
    lines.append("by method: " + ", ".join(f"{k} {_fmt_time(v)}" for k, v in by_method.items()))
    by_length: dict[int, float] = {}
    for c in plan.cells:
        by_length[c.length] = by_length.get(c.length, 0.0) + c.est_seconds
    lines.append("by length: " + ", ".join(
        f"{format_length(k)} {_fmt_time(v)}" for k, v in sorted(by_length.items())))
    infeasible = [c for c in plan.cells if c.infeasible]
    seen = set()
    for c in infeasible:
        if (c.method.label, c.length) in seen:
            continue
        seen.add((c.method.label, c.length))
        lines.append(f"infeasible: {c.method.label} at {format_length(c.length)}: {c.infeasible}")
    if time_budget:
        acc = 0.0
        fits = 0
        for g in plan.groups:
            acc += plan.cost.engine_start if g.kind != ENDPOINT_KIND else 0
            acc += sum(c.est_seconds for c in plan.cells if c.length == g.length
                       and c.method in g.methods and not c.infeasible)
            if acc > time_budget:
                break
            fits += 1
        lines.append(f"time budget {_fmt_time(time_budget)}: about {fits} of {len(plan.groups)} "
                     "engine groups fit (shortest lengths run first)")
    return "\n".join(lines)


def _fmt_time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _kv_cache_bytes(options: RunOptions, facts: ModelFacts, group: Group) -> int:
    if options.kv_cache_gib:
        return int(options.kv_cache_gib * (1 << 30))
    per_token = facts.kv_bytes_per_token * (1.5 if group.kind == "mesa" else 1.0)
    tokens = max(options.batch_tokens, group.length) + group.length
    return int(per_token * tokens) + (256 << 20)


def _chunks(samples: list[Sample], chunk_tokens: int) -> list[list[Sample]]:
    """Consecutive batches of at most ``chunk_tokens`` prompt tokens (at least one prompt)."""
    chunks: list[list[Sample]] = []
    current: list[Sample] = []
    size = 0
    for s in samples:
        if current and size + s.num_tokens > chunk_tokens:
            chunks.append(current)
            current, size = [], 0
        current.append(s)
        size += s.num_tokens
    if current:
        chunks.append(current)
    return chunks


def _trim_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("needle_char",)}


class Runner:
    def __init__(self, grid: Grid, options: RunOptions):
        self.grid = grid
        self.options = options
        self.store = ResultStore(options.out_dir)
        self.run_id = uuid.uuid4().hex[:8]
        self.model = options.model
        self.tokenizer = None
        self._samples: dict[tuple[str, int, int], Sample] = {}
        self._sample_length = None
        if options.model is None:
            from mesa_vllm.assets import smollm2_path

            self.model = str(smollm2_path(verbose=True))
        tok_source = options.tokenizer or self.model
        self.facts = ModelFacts.from_model_dir(tok_source if options.endpoint and not Path(
            self.model).is_dir() else self.model, options.trained_len)
        cost = CostModel()
        folders = [Path(options.out_dir), *options.calibrate_from]
        runs = [r for folder in folders for r in read_rows(folder / "runs.jsonl")]
        starts = [r["engine_start_s"] for r in runs if r.get("engine_start_s")]
        if starts:
            from dataclasses import replace

            cost = replace(cost, engine_start=sum(starts) / len(starts))
        timed = list(self.store.rows.values())
        for folder in options.calibrate_from:
            timed += read_rows(folder / "results.jsonl")
        self.cost = cost.calibrated(timed, self.facts.trained_len)
        label = (options.endpoint.get("label") or "endpoint") if options.endpoint else None
        self._twin_rows = self._reuse_twins() if label is None else []
        self.plan = make_plan(grid, self.store, self.facts, self.cost, label)

    def _reuse_twins(self) -> list[dict]:
        """Samples another label already ran on an identical engine are not run again: their
        rows are copied under this label, marked ``same_engine_as`` (e.g. after a default
        change made ``mesa`` resolve to a sweep point that has results). The copies count as
        done for the plan; :meth:`run` writes them."""
        copies = []
        for cell in self.grid.cells():
            config = engine_config(cell.method, cell.length, self.facts.trained_len,
                                   self.facts.rope_parameters)
            if config.infeasible:
                continue
            for i in range(cell.samples):
                key = (cell.task, cell.method.label, cell.length, i)
                if self.store.done(key, engine=config.info):
                    continue
                twin = self.store.twin(key, cell.method.kind, config.info, self.model,
                                       self.options.seed + i)
                if twin is not None:
                    copies.append({**twin, "method": cell.method.label, "run_id": self.run_id,
                                   "same_engine_as": twin["method"]})
        if copies:
            self.options.log(f"reusing {len(copies)} samples run before by identical engines "
                             f"({', '.join(sorted({c['same_engine_as'] for c in copies}))})")
            self.store.rows.update((row_key(c), c) for c in copies)
        return copies

    # -- prompts ---------------------------------------------------------------------------
    def _tok(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.options.tokenizer or self.model)
        return self.tokenizer

    def sample(self, task: str, length: int, index: int) -> Sample:
        if self._sample_length != length:  # keep one length's prompts in memory at a time
            self._samples.clear()
            self._sample_length = length
        key = (task, length, index)
        if key not in self._samples:
            spec = get_task(task)
            seed = self.options.seed + index
            depth = depth_for(task, self.options.seed, index) if spec.uses_depth else None
            self._samples[key] = spec.make(self._tok(), length - spec.max_new_tokens,
                                           seed=seed, depth=depth)
        return self._samples[key]

    # -- running ---------------------------------------------------------------------------
    def run(self) -> dict:
        options, plan = self.options, self.plan
        for name in [k for k in os.environ if k.startswith("MESA_") and k[5:] in
                     ("F", "C", "R", "E", "LOG_N")]:
            options.log(f"note: ignoring {name}={os.environ[name]} (methods carry their own "
                        "mesa parameters)")
            del os.environ[name]
        if self._twin_rows:
            append_rows(self.store.path, self._twin_rows)
            self._twin_rows = []
        todo = sum(len(g.items) for g in plan.groups)
        started = time.monotonic()
        deadline = started + options.time_budget if options.time_budget else None
        self.store.log_run({
            "run_id": self.run_id, "time": _now(), "grid": self.grid.as_dict(),
            "model": self.model, "trained_len": self.facts.trained_len,
            "endpoint": {k: v for k, v in (options.endpoint or {}).items() if k != "api_key"},
            "engine_args": options.engine_kwargs,  # --engine-arg: part of what made the rows
            "engines": {g.methods[0].label + "@" + str(g.length): g.config.info
                        for g in plan.groups},
            "planned": [[c.task, c.method.label, c.length, c.planned] for c in plan.cells],
            "infeasible": [[c.task, c.method.label, c.length, c.infeasible]
                           for c in plan.cells if c.infeasible],
        })
        bar = None
        if options.progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=plan.total_seconds, unit="est-s", dynamic_ncols=True,
                       smoothing=0.1, file=sys.stderr,
                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} est-s "
                                  "[{elapsed}<{remaining}{postfix}]")
        stats = {"samples": 0, "rows": 0, "stopped": None, "engines": 0}
        ratio = [0.0, 0.0]  # measured seconds, estimated seconds (to re-scale estimates)
        endpoint = None
        try:
            for group in plan.groups:
                if deadline and time.monotonic() + self._scaled(self.cost.engine_start, ratio) \
                        > deadline:
                    stats["stopped"] = "time budget"
                    break
                if options.endpoint:
                    if endpoint is None:
                        endpoint = self._endpoint()
                    backend = endpoint
                else:
                    backend = self._engine(group)
                    stats["engines"] += 1
                    if bar is not None:
                        bar.update(min(self.cost.engine_start, bar.total - bar.n))
                try:
                    stop = self._run_group(group, backend, bar, stats, ratio, deadline, todo)
                finally:
                    if backend is not endpoint:
                        backend.close()
                if stop:
                    stats["stopped"] = stop
                    break
        except KeyboardInterrupt:
            stats["stopped"] = "interrupted"
            options.log("\ninterrupted: finished batches are saved; run again to resume")
        finally:
            if bar is not None:
                bar.close()
        stats["seconds"] = time.monotonic() - started
        return stats

    def _scaled(self, est: float, ratio: list[float]) -> float:
        return est * (ratio[0] / ratio[1] if ratio[1] > 0 else 1.0)

    def _endpoint(self):
        from mesa_vllm.evaluation.backends import EndpointClient

        e = self.options.endpoint
        client = EndpointClient(e["url"], e.get("model"), api_key=e.get("api_key"),
                                prompt_mode=e.get("prompt_mode", "tokens"),
                                timeout=e.get("timeout", 3600.0),
                                concurrency=e.get("concurrency", 4))
        self.endpoint_model = client.model
        return client

    def _engine(self, group: Group):
        from mesa_vllm.evaluation.backends import OfflineEngine

        labels = ", ".join(m.label for m in group.methods)
        self.options.log(f"\n[{format_length(group.length)}] starting engine for {labels} "
                         f"{json.dumps(group.config.info)}")
        engine = OfflineEngine(self.model, group.config,
                               kv_cache_bytes=_kv_cache_bytes(self.options, self.facts, group),
                               enforce_eager=self.options.enforce_eager, seed=self.options.seed,
                               prefix_caching=self.options.prefix_caching,
                               extra_kwargs=self.options.engine_kwargs)
        self.store.log_run({"run_id": self.run_id, "time": _now(), "engine": labels,
                            "length": group.length, "engine_start_s": engine.start_seconds})
        return engine

    def _run_group(self, group: Group, backend, bar, stats, ratio, deadline, todo) -> str | None:
        options = self.options
        geometry = group.config.info.get("mesa")
        for task in self.grid.tasks:
            indices = sorted(i for (t, i) in group.items if t == task)
            if not indices:
                continue
            spec = get_task(task)
            work: list[tuple[Sample, list[Method]]] = []
            for i in indices:
                sample = self.sample(task, group.length, i)
                sha = prompt_sha(sample.token_ids)
                wanted = []
                for method in group.items[(task, i)]:
                    key = (task, method.label, group.length, i)
                    if self.store.done(key, sha, engine=group.config.info):
                        continue
                    if self.store.done(key, engine=group.config.info):
                        options.log(f"note: {key} was run on a different prompt; running again")
                    elif self.store.done(key):
                        options.log(f"note: {key} was run by a different engine (a default "
                                    "changed?); running again")
                    wanted.append(method)
                if wanted:
                    work.append((sample, wanted))
                elif bar is not None:
                    bar.update(0)
            # Deepest needle first: later prompts find the filler before their needle cached.
            work.sort(key=lambda w: -(w[0].meta.get("depth") or 0.0))
            samples = [w[0] for w in work]
            wanted_by_id = {id(w[0]): w[1] for w in work}
            kind = "mesa" if group.kind == "mesa" else "dense"
            per = self.cost.sample_seconds(kind, group.length, spec.max_new_tokens, 0, geometry,
                                           self.facts.trained_len,
                                           logprobs=spec.kind == "logprobs")
            chunk_tokens = options.batch_tokens
            if options.endpoint:
                chunk_tokens = max(1, int(options.endpoint.get("concurrency", 4))) * group.length
            cell_scores: list[float] = []  # this run's scores in this cell, for the bar
            for chunk in _chunks(samples, chunk_tokens):
                est = per * len(chunk)
                if deadline and time.monotonic() + self._scaled(est, ratio) > deadline:
                    return "time budget"
                t0 = time.monotonic()
                if spec.kind == "logprobs":
                    results = backend.logprobs(chunk)
                else:
                    results = backend.generate(chunk, spec.max_new_tokens)
                elapsed = time.monotonic() - t0
                rows = []
                for sample, result in zip(chunk, results):
                    seconds = result.pop("seconds", None)
                    if seconds is None:
                        seconds = elapsed / len(chunk)
                    for method in wanted_by_id[id(sample)]:
                        rows.append(self._row(task, method, group, sample, result, seconds,
                                              elapsed, len(chunk)))
                self.store.append(rows)
                if group.kind != ENDPOINT_KIND:
                    ratio[0] += elapsed
                    ratio[1] += est
                stats["samples"] += len(chunk)
                stats["rows"] += len(rows)
                if bar is not None:
                    # Running mean of the cell so far, not of the last batch alone.
                    cell_scores += [r["score"] for r in rows if r.get("score") is not None]
                    bar.set_postfix_str(
                        f"{stats['samples']}/{todo} samples, {task}@{format_length(group.length)}"
                        + (f" acc {sum(cell_scores) / len(cell_scores):.2f}"
                           if cell_scores else ""))
                    bar.update(min(est, bar.total - bar.n))
        return None

    def _row(self, task, method, group, sample, result, seconds, chunk_seconds, chunk_size):
        spec = get_task(task)
        row = {
            "task": task, "method": method.label, "kind": method.kind, "length": group.length,
            "index": sample.seed - self.options.seed, "seed": sample.seed,
            "depth": sample.meta.get("depth"), "num_tokens": sample.num_tokens,
            "prompt_sha": prompt_sha(sample.token_ids), "answer": sample.answer,
            "backend": "endpoint" if self.options.endpoint else "vllm",
            "model": getattr(self, "endpoint_model", None) or self.model,
            "engine": group.config.info, "run_id": self.run_id, "time": _now(),
            "seconds": round(seconds, 3), "chunk_seconds": round(chunk_seconds, 3),
            "chunk_size": chunk_size, "meta": _trim_meta(sample.meta),
        }
        if "error" in result:
            row.update({"error": result["error"], "score": None})
            return row
        row.update({k: result.get(k) for k in ("gen_tokens", "finish_reason", "cached_tokens",
                                                "server_prompt_tokens") if k in result})
        if spec.kind == "logprobs":
            st = ppl_stats(result["token_logprobs"])
            row.update(st)
            row["ppl"] = perplexity(st["nll_sum"], st["n_scored"])
            row["tail_ppl"] = perplexity(st["tail_nll_sum"], st["tail_n"])
            row["score"] = None
        else:
            row["output"] = result["output"]
            row["score"] = spec.score(result["output"], sample)
        return row


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
