"""Small helpers around ``vllm.LLM`` used by the CLI and the tests."""

from __future__ import annotations

import gc


def shutdown_llm(llm) -> None:
    """Stop a ``vllm.LLM``'s engine processes now, rather than whenever it is garbage collected.

    Without this, a script that lets its ``LLM`` go out of scope can hang at exit:
    multiprocessing joins the still-running EngineCore child before the engine's finalizer has
    told it to stop. The caller should drop its own reference afterwards.
    """
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(engine_core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # already stopped or half-started; nothing left to free
            pass
    gc.collect()
