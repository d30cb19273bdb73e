"""Extrapolation methods compared by ``mesa-vllm eval`` and how each becomes a vLLM engine.

A method is written ``KIND`` or ``KIND:key=value,key=value``:

- ``origin``: vLLM's default attention with plain RoPE. Past ``T`` the model's rotary table is
  extended to the engine's length (``hf_overrides={"max_position_embeddings": L}``), so positions
  past ``T`` are rotated correctly: the "no extrapolation method" baseline.
- ``yarn``: YaRN through ``hf_overrides["rope_parameters"]`` (``rope_type="yarn"``,
  ``original_max_position_embeddings=T``). Its ``factor`` is matched to the length: ``L / T`` for
  ``L > T``; for ``L <= T`` no scaling is needed and the engine is the ``origin`` one. ``yarn:factor=4``
  fixes the factor at every length instead (its max length is then ``factor * T``).
- ``ntk``: dynamic NTK (``rope_type="dynamic"``), matched the same way (``factor = L / T``). vLLM
  computes dynamic NTK once for the engine's maximum length (not per sequence as Hugging Face
  does): with ``max_position_embeddings = L`` and ``max_trained_positions = T`` the rotary base
  becomes ``theta * (factor * L / T - (factor - 1)) ** (d / (d - 2))``, which is Hugging Face's
  dynamic NTK evaluated at sequence length ``L``, the length of the prompts in the cell.
  ``ntk:factor=F`` fixes the factor.
- ``mesa``: ``attention_backend="mesa"`` with ``max_model_len = L``, so the default parameters are
  the ones a user serving length ``L`` gets. ``mesa:E=4,R=512,log_n=false`` overrides any of
  ``F, C, R, E, log_n, stair`` (``additional_config={"mesa": {...}}``). A setting that cannot serve
  ``L`` (the stair capacity ``E * (T - 1 - R)``) makes that cell infeasible; it is skipped and
  reported, not run.

Every cell of length ``L`` runs on an engine with ``max_model_len = L`` (prompt + generated
tokens fit in ``L``), the best case for every method: the engine is sized to the prompt. A
server has one ``max_model_len`` for prompts of every length; ``max_len=32k`` (any method)
fixes the engine's length instead, so shorter prompts run on the engine a server would have
(mesa's ``E`` and the matched ``yarn``/``ntk`` factors follow ``max_len``, not ``L``). Two
methods whose engines would be identical (``yarn``/``ntk`` and ``origin`` at ``L <= T``) share
one engine and its outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

KINDS = ("origin", "yarn", "ntk", "mesa")
_PARAMS = {
    "origin": {"max_len"},
    "yarn": {"factor", "beta_fast", "beta_slow", "max_len"},
    "ntk": {"factor", "max_len"},
    "mesa": {"F", "C", "R", "E", "log_n", "stair", "max_len"},
}


class MethodError(ValueError):
    """A method string that cannot be parsed or used."""


@dataclass(frozen=True)
class Method:
    label: str
    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def is_variant(self) -> bool:
        """True for a method with explicit parameters (a sweep point, not the plain method)."""
        return bool(self.params)


def _parse_value(text: str, key: str = "") -> Any:
    low = text.strip().lower()
    if key == "max_len":  # a length: 32768 or 32k
        from mesa_vllm.evaluation.grid import parse_length

        try:
            return parse_length(text)
        except ValueError as exc:
            raise MethodError(str(exc)) from None
    if key == "stair":  # a word: the stair shape, checked by the engine's own parser
        from mesa_vllm.params import MesaConfigError, parse_stair

        try:
            return parse_stair(text)
        except MesaConfigError as exc:
            raise MethodError(str(exc)) from None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        raise MethodError(f"cannot read the value {text!r}") from None


def parse_method(text: str) -> Method:
    """``"mesa:E=4,R=512"`` -> ``Method("mesa:E=4,R=512", "mesa", (("E", 4), ("R", 512)))``."""
    text = text.strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise MethodError(f"unknown method {kind!r} in {text!r}; methods: {', '.join(KINDS)}")
    params: list[tuple[str, Any]] = []
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if kind == "mesa":
                key = {k.lower(): k for k in _PARAMS["mesa"]}.get(key.lower(), key)
            if not eq or key not in _PARAMS[kind]:
                allowed = ", ".join(sorted(_PARAMS[kind])) or "none"
                raise MethodError(f"bad parameter {item!r} for {kind}; parameters: {allowed}")
            params.append((key, _parse_value(value, key)))
    label = kind + (":" + ",".join(f"{k}={_fmt(v, k)}" for k, v in params) if params else "")
    return Method(label, kind, tuple(params))


def _fmt(value: Any, key: str = "") -> str:
    if key == "max_len":
        from mesa_vllm.evaluation.grid import format_length

        return format_length(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class EngineConfig:
    """What one vLLM engine for a (method, length) cell needs, or why the cell is infeasible."""

    max_model_len: int
    llm_kwargs: dict = field(default_factory=dict)  # besides model, max_model_len, sizing
    env: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # factor, mesa geometry, ... (recorded in results)
    infeasible: str | None = None

    @property
    def key(self) -> str:
        """Identical keys mean identical engines (and outputs)."""
        return json.dumps({"len": self.max_model_len, "kw": self.llm_kwargs, "env": self.env},
                          sort_keys=True)


def engine_config(method: Method, length: int, trained_len: int,
                  rope_parameters: dict | None = None) -> EngineConfig:
    """The engine for ``method`` at cell length ``length`` on a model with trained length ``T``.

    ``rope_parameters``: the model's own (``config.json``), kept under any scaling added here
    (so ``rope_theta`` is preserved).
    """
    config = _engine_config(method, length, trained_len, rope_parameters)
    if "max_len" in method.param_dict and not config.infeasible:
        # A fixed engine length is part of what made the rows (results keep it apart).
        return replace(config, info={**config.info, "max_model_len": config.max_model_len})
    return config


def _engine_config(method: Method, length: int, trained_len: int,
                   rope_parameters: dict | None) -> EngineConfig:
    T = int(trained_len)
    params = method.param_dict
    L = int(params.pop("max_len", length))  # the engine's length
    if L < int(length):
        return EngineConfig(L, infeasible=(
            f"max_len={L} is shorter than the cell's length {int(length)}"))
    base_rope = {k: v for k, v in (rope_parameters or {}).items()
                 if k in ("rope_theta", "partial_rotary_factor")}

    def plain(info=None) -> EngineConfig:
        if L <= T:
            return EngineConfig(L, {}, {}, info or {})
        return EngineConfig(L, {"hf_overrides": {"max_position_embeddings": L}}, {}, info or {})

    if method.kind == "origin":
        return plain()

    if method.kind in ("yarn", "ntk"):
        fixed = "factor" in params
        factor = float(params["factor"]) if fixed else max(1.0, L / T)
        if factor < 1.0:
            return EngineConfig(L, infeasible=f"{method.kind} factor must be >= 1, got {factor}")
        if not fixed and L <= T:
            return plain({"factor": 1.0, "same_as": "origin"})
        if method.kind == "yarn":
            limit = int(T * factor)
            if L > limit:
                return EngineConfig(L, infeasible=(
                    f"yarn factor {factor} serves at most {limit} tokens (factor * T), "
                    f"the cell needs {L}"))
            rope = {**base_rope, "rope_type": "yarn", "factor": factor,
                    "original_max_position_embeddings": T,
                    **{k: params[k] for k in ("beta_fast", "beta_slow") if k in params}}
            # vLLM reads YaRN's max length from max_position_embeddings (already scaled).
            overrides = {"rope_parameters": rope, "max_position_embeddings": limit}
        else:
            rope = {**base_rope, "rope_type": "dynamic", "factor": factor,
                    "max_trained_positions": T}
            # vLLM's rotary table spans max_position_embeddings; NTK is computed for that length.
            overrides = {"rope_parameters": rope, "max_position_embeddings": max(L, T)}
        return EngineConfig(L, {"hf_overrides": overrides}, {}, {"factor": factor})

    if method.kind == "mesa":
        from mesa_vllm.params import MesaConfigError, resolve_geometry

        try:
            geometry = resolve_geometry(T, L, params)
        except MesaConfigError as error:
            return EngineConfig(L, infeasible=str(error))
        kwargs: dict[str, Any] = {"attention_backend": "mesa"}
        if params:
            kwargs["additional_config"] = {"mesa": {k: params[k] for k in sorted(params)}}
        return EngineConfig(L, kwargs, {}, {"mesa": geometry.as_dict()})

    raise MethodError(f"unknown method kind {method.kind!r}")
