"""Mesa parameters: defaults from ``T`` and ``max_model_len``, user overrides, validation.

Users override any of ``F, C, R, E, log_n, stair`` through vLLM's ``additional_config``::

    vllm serve MODEL --attention-backend mesa --additional-config '{"mesa": {"E": 8}}'
    LLM(model, attention_backend="mesa", additional_config={"mesa": {"E": 8}})

or through environment variables ``MESA_F``, ``MESA_C``, ``MESA_R``, ``MESA_E``,
``MESA_LOG_N``, ``MESA_STAIR`` (read in the process that builds the engine config). ``additional_config``
wins over the environment. A setting that breaks the rule's limits is refused with a
message that names the limit and a value that works.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from mesa_vllm.rule import STAIR_SHAPES, STAIR_STEP, MesaGeometry

PARAM_NAMES = ("F", "C", "R", "E", "log_n", "stair")
# Hugging Face config attribute (JSON) through which every engine process gets the
# resolved parameters; set by mesa_vllm.engine.
GEOMETRY_CONFIG_KEY = "mesa_geometry"
ENV_PREFIX = "MESA_"

# Default shape, as fractions of T: a sink and middle chunks well inside T, and an exact
# window of T/2. Chosen by the sweep on SmolLM2 (benchmarks/results/long_context; README,
# Parameters, "How the defaults were chosen"): passkey at 32k is 0.95 with R = T/2
# against 0.45 with T/8, 0.65 with T/4 and 0.70 with 3T/8; 16k stays at 0.95-1.00 (0.90
# on a 32k engine, T/8 0.80) and no window reaches 0.9 at 64k. The price is prefill: the
# last R prompt tokens attend to every key (+61% prefill time at 32k against T/8, still
# 2.45x faster than the default backend; decode unchanged on the host without AMX).
# A coarser stair (E=8), log_n off and the linear stair were no better at 32k.
DEFAULT_R_FRACTION = 1 / 2
# The window that error messages offer as "a value that works": narrow enough to leave the
# stair room to cover long lengths.
SAFE_R_FRACTION = 1 / 8
DEFAULT_F_FRACTION = 1 / 64
DEFAULT_C_FRACTION = 1 / 4
# With no --max-model-len, mesa serves this many times the trained length.
DEFAULT_EXTENSION = 4


class MesaConfigError(ValueError):
    """A Mesa setting that cannot work; the message says why and what would."""


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise MesaConfigError(f"mesa parameter {name}={value!r} is not a boolean; use true or false.")


def _parse_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise MesaConfigError(f"mesa parameter {name}={value!r} must be a whole number.")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise MesaConfigError(f"mesa parameter {name}={value!r} must be a whole number.") from None
    return number


def parse_stair(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in STAIR_SHAPES:
        raise MesaConfigError(
            f"mesa parameter stair={value!r} is not a stair shape; use one of "
            f"{', '.join(STAIR_SHAPES)} ({STAIR_STEP} is the spec's stair)."
        )
    return text


def read_overrides(
    explicit: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Collect user overrides: ``explicit`` (e.g. ``additional_config["mesa"]``) over env."""
    environ = os.environ if environ is None else environ
    overrides: dict[str, Any] = {}
    for name in PARAM_NAMES:
        env_value = environ.get(ENV_PREFIX + name.upper())
        if env_value not in (None, ""):
            overrides[name] = env_value
    for key, value in dict(explicit or {}).items():
        name = {k.lower(): k for k in PARAM_NAMES}.get(str(key).lower())
        if name is None:
            raise MesaConfigError(
                f"unknown mesa parameter {key!r}; the parameters are {', '.join(PARAM_NAMES)}."
            )
        overrides[name] = value
    parsed: dict[str, Any] = {}
    for name, value in overrides.items():
        if name == "log_n":
            parsed[name] = _parse_bool(name, value)
        elif name == "stair":
            parsed[name] = parse_stair(value)
        else:
            parsed[name] = _parse_int(name, value)
    return parsed


def trained_length(config: Any) -> int:
    """``T`` of a Hugging Face config (spec, notation).

    ``max_position_embeddings``, or the original length before rope scaling when the
    config carries ``original_max_position_embeddings`` (in its rope parameters --
    ``rope_parameters`` in transformers 5, ``rope_scaling`` before -- or at top level, as
    Phi-3 does). An "original" length above ``max_position_embeddings`` (Phi-3's config
    class defaults it to 4096) is not a scaling and is ignored.
    """
    value = getattr(config, "max_position_embeddings", None)
    originals = []
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if isinstance(params, dict) and params.get("original_max_position_embeddings"):
            originals.append(int(params["original_max_position_embeddings"]))
    if getattr(config, "original_max_position_embeddings", None):
        originals.append(int(config.original_max_position_embeddings))
    if not value and not originals:
        raise MesaConfigError(
            f"{type(config).__name__} has no max_position_embeddings; cannot tell the "
            "trained length T. Pass T explicitly."
        )
    if not value:
        return min(originals)
    return min([int(value), *originals])


def default_max_model_len(trained_len: int) -> int:
    return DEFAULT_EXTENSION * trained_len


def resolve_geometry(
    trained_len: int, max_model_len: int, overrides: Mapping[str, Any] | None = None
) -> MesaGeometry:
    """Defaults derived from ``T`` and ``max_model_len``, with ``overrides`` applied.

    Default choice: ``R = T/2``, ``F = T/64``, ``C = T/4`` (capped so ``F + C <= T``), and
    the smallest stair step ``E`` that lets the stair cover ``max_model_len`` (``F`` and
    ``R`` rounded up to multiples of ``E``, as the rule requires).
    """
    T = int(trained_len)
    if T < 8:
        raise MesaConfigError(f"trained length T={T} is too short for Mesa (need T >= 8).")
    if max_model_len < 1:
        raise MesaConfigError(f"max_model_len={max_model_len} must be positive.")
    given = dict(read_overrides(overrides, environ={}) if overrides else {})

    for name in ("F", "C", "R", "E"):
        if name in given and given[name] < (0 if name == "F" else 1):
            floor = 0 if name == "F" else 1
            raise MesaConfigError(f"mesa parameter {name}={given[name]} must be >= {floor}.")

    R_wanted = given.get("R", max(1, int(T * DEFAULT_R_FRACTION)))
    F_wanted = given.get("F", max(1, int(T * DEFAULT_F_FRACTION)))

    if "E" in given:
        E = given["E"]
    else:
        # Smallest E whose stair reaches max_model_len once R is rounded to a multiple of E.
        E = max(1, math.ceil(max_model_len / max(1, T - 1 - R_wanted)))
        while E < T and E * (T - 1 - _round_up(R_wanted, E)) < max_model_len:
            E += 1
        if E >= T:
            # No stair step covers max_model_len: name the limit that really fails (not
            # whatever the degenerate E = T would break first) and a value that works.
            if R_wanted >= T - 1:
                raise MesaConfigError(
                    f"mesa limit R < T - 1 is broken: R={R_wanted}, T={T}. A value that "
                    f"works: R={max(1, int(T * SAFE_R_FRACTION))}."
                )
            if F_wanted >= T:
                raise MesaConfigError(
                    f"mesa limit F + C <= T is broken: F={F_wanted} >= T={T} leaves no room "
                    f"for a middle chunk. A value that works: "
                    f"F={max(1, int(T * DEFAULT_F_FRACTION))}."
                )
            best = max(
                (e * (T - 1 - _round_up(R_wanted, e)) for e in range(1, T)
                 if _round_up(R_wanted, e) < T - 1 and _round_up(F_wanted, e) < T),
                default=0,
            )
            raise MesaConfigError(
                f"mesa limit max_model_len <= E * (T - 1 - R) cannot be met: max_model_len="
                f"{max_model_len} is more than any stair step E serves with T={T} and "
                f"R={R_wanted} (at most {best}). Use --max-model-len {best} or a smaller R."
            )
    # Defaults go on the E grid. So do user values when E was chosen here (its search
    # assumed R on the grid); with E given too, user values are checked as given.
    R = R_wanted if "R" in given and "E" in given else _round_up(R_wanted, E)
    F = F_wanted if "F" in given and "E" in given else _round_up(F_wanted, E)
    C = given.get("C", max(1, min(int(T * DEFAULT_C_FRACTION), T - F)))
    log_n = given.get("log_n", True)
    stair = given.get("stair", STAIR_STEP)

    geometry = MesaGeometry(T=T, F=F, C=C, R=R, E=E, log_n=log_n, stair=stair)
    validate_geometry(geometry, max_model_len)
    return geometry


def validate_geometry(geom: MesaGeometry, max_model_len: int) -> None:
    """Refuse settings that would put a relative position at or past ``T``."""
    T, F, C, R, E = geom.T, geom.F, geom.C, geom.R, geom.E
    if E < 1:
        raise MesaConfigError(f"mesa E={E} must be >= 1.")
    if R < E:
        raise MesaConfigError(f"mesa R={R} must be at least E={E} (try R={_round_up(max(R, 1), E)}).")
    if F % E or R % E:
        bad = "F" if F % E else "R"
        value = F if bad == "F" else R
        raise MesaConfigError(
            f"mesa {bad}={value} must be a multiple of E={E} (the stair grid); "
            f"try {bad}={_round_up(value, E)}."
        )
    if C < 1:
        raise MesaConfigError(f"mesa C={C} must be >= 1.")
    if F + C > T:
        if F < T:
            hint = f"C={T - F}"
        else:  # no C >= 1 fits: the first chunk itself must shrink (to a multiple of E)
            good_f = E * ((T - 1) // E)
            hint = f"F={good_f} with C={min(C, T - good_f)}"
        raise MesaConfigError(
            f"mesa limit F + C <= T is broken: F={F} + C={C} = {F + C} > T={T}. "
            f"A value that works: {hint}."
        )
    if R >= T - 1:
        raise MesaConfigError(
            f"mesa limit R < T - 1 is broken: R={R}, T={T}. A value that works: "
            f"R={_round_up(max(E, int(T * SAFE_R_FRACTION)), E)}."
        )
    capacity = geom.max_supported_len
    if max_model_len > capacity:
        # The smallest E that works with this R (R and F then rounded up to it).
        fix_e = E
        while fix_e < T and fix_e * (T - 1 - _round_up(R, fix_e)) < max_model_len:
            fix_e += 1
        hint = (
            f"Use E={fix_e} (with R={_round_up(R, fix_e)}, F={_round_up(F, fix_e)}) "
            f"or --max-model-len {capacity}."
            if fix_e < T
            else f"Use --max-model-len {capacity} or a smaller R."
        )
        raise MesaConfigError(
            f"mesa limit max_model_len <= E * (T - 1 - R) is broken: max_model_len="
            f"{max_model_len} > {E} * ({T} - 1 - {R}) = {capacity}, so the stair would "
            f"reach relative positions the model never saw. {hint}"
        )


def describe(geom: MesaGeometry, max_model_len: int) -> str:
    return (
        f"mesa: T={geom.T} F={geom.F} C={geom.C} R={geom.R} E={geom.E} "
        f"log_n={geom.log_n} stair={geom.stair} max_model_len={max_model_len} "
        f"(stair capacity {geom.max_supported_len})"
    )


def geometry_to_json(geom: MesaGeometry) -> str:
    return json.dumps(geom.as_dict())


def geometry_from_hf_config(hf_config: Any) -> MesaGeometry:
    raw = getattr(hf_config, GEOMETRY_CONFIG_KEY, None)
    if raw is None:
        raise RuntimeError(
            "The MESA attention backend was selected but the engine was not configured "
            "for it. Start vLLM with `--attention-backend mesa` (or "
            "`LLM(..., attention_backend='mesa')`) with mesa-vllm installed, so the "
            "plugin can set the model up."
        )
    return MesaGeometry(**json.loads(raw))
