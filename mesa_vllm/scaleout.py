"""Scale-out with Ray: many mesa engines, each a stock vLLM engine inside Ray's LLM layer.

Nothing here runs its own engine or scheduler. Ray's LLM libraries start the vLLM engines
(``vllm.AsyncEngineArgs`` -> ``AsyncLLMEngine``), and the ``mesa`` plugin loads in each of
them exactly as in ``vllm serve``: ``attention_backend="mesa"`` in ``engine_kwargs`` is the
only Mesa-specific setting. These helpers fill in that setting and the CPU placement so
that tests, docs and scripts share one recipe.

* Batch: :func:`batch_processor_config` / :func:`build_batch_processor` give a
  ``ray.data.llm`` processor whose engine stage runs ``replicas`` mesa engines side by side
  over a Ray Dataset (rows spread across them).
* Online: :func:`serve_llm_config` gives a ``ray.serve.llm.LLMConfig`` for an
  OpenAI-compatible Ray Serve app with ``replicas`` mesa engines behind one endpoint.

CPU vs GPU. vLLM 0.32's own Ray executor (``distributed_executor_backend="ray"``) refuses
the CPU platform, so on CPU each replica is one engine with the in-process (``uni``, for
Ray Data) or multiprocess (``mp``, Ray Serve's CPU default) executor, placed by a
``{"CPU": n}`` bundle. With ``gpus_per_replica > 0`` the helpers leave executor and
placement to Ray (GPU bundles; the ``ray`` executor for tensor/pipeline parallel), which is
the path for GPU clusters; the mesa backend itself makes no CPU-only assumption.

Ray is an optional dependency: ``pip install 'mesa-vllm[ray]'`` (``ray[data,serve]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


def mesa_engine_kwargs(
    engine_kwargs: Mapping[str, Any] | None = None,
    *,
    max_model_len: int | None = None,
    mesa: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """vLLM engine keyword arguments with the mesa backend switched on.

    ``mesa`` holds parameter overrides (``{"E": 8}``), passed as
    ``additional_config={"mesa": ...}`` exactly as ``--additional-config`` does.
    """
    kwargs = dict(engine_kwargs or {})
    kwargs["attention_backend"] = "mesa"
    if max_model_len is not None:
        kwargs["max_model_len"] = int(max_model_len)
    if mesa:
        kwargs["additional_config"] = {**dict(kwargs.get("additional_config") or {}),
                                       "mesa": dict(mesa)}
    return kwargs


def _require_ray(module: str) -> None:
    try:
        __import__(module)
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{module} is needed for scale-out: pip install 'mesa-vllm[ray]' "
            f"(ray[data,serve]). ({error})"
        ) from error


# ---------------------------------------------------------------------------------------
# Batch inference: ray.data.llm
def batch_processor_config(
    model: str,
    *,
    replicas: int = 1,
    cpus_per_replica: float = 1,
    gpus_per_replica: float = 0,
    engine_kwargs: Mapping[str, Any] | None = None,
    max_model_len: int | None = None,
    mesa: Mapping[str, Any] | None = None,
    tokenized: bool = False,
    batch_size: int = 4,
    max_concurrent_batches: int = 4,
    runtime_env: Mapping[str, Any] | None = None,
    **config: Any,
):
    """A ``ray.data.llm.vLLMEngineProcessorConfig`` running ``replicas`` mesa engines.

    ``replicas`` is a fixed pool (``concurrency=(replicas, replicas)``). ``tokenized=True``
    takes token ids (a ``tokenized_prompt`` column) and returns token ids (no tokenizer
    stages, for models without one); otherwise rows carry a text ``prompt`` and Ray
    tokenizes and detokenizes. Extra keyword arguments go to the config unchanged.
    """
    _require_ray("ray.data.llm")
    from ray.data.llm import vLLMEngineProcessorConfig

    kwargs = mesa_engine_kwargs(engine_kwargs, max_model_len=max_model_len, mesa=mesa)
    if gpus_per_replica:
        placement = None  # Ray's defaults: GPU bundles, `ray` executor for TP/PP > 1
    else:
        # vLLM's Ray executor refuses CPU: one in-process engine per replica.
        kwargs.setdefault("distributed_executor_backend", "uni")
        placement = {"bundles": [{"CPU": cpus_per_replica}], "strategy": "PACK"}
    if tokenized:
        kwargs.setdefault("skip_tokenizer_init", True)
    options: dict[str, Any] = dict(
        model_source=str(model),
        engine_kwargs=kwargs,
        concurrency=(replicas, replicas),
        batch_size=batch_size,
        max_concurrent_batches=max_concurrent_batches,
        chat_template_stage=False,
        tokenize_stage=not tokenized,
        detokenize_stage=not tokenized,
        log_engine_metrics=False,
    )
    if placement is not None:
        options["placement_group_config"] = placement
    if runtime_env is not None:
        options["runtime_env"] = dict(runtime_env)
    options.update(config)
    return vLLMEngineProcessorConfig(**options)


def build_batch_processor(
    config,
    *,
    sampling_params: Mapping[str, Any] | None = None,
    keep: Sequence[str] = (),
    postprocess: Callable[[dict], dict] | None = None,
):
    """``ray.data.llm.build_processor`` for rows ``{"prompt": str}`` or
    ``{"tokenized_prompt": [ids]}``, plus columns of your own.

    Every row gets ``sampling_params`` (greedy, 16 tokens unless given). The default
    postprocess returns the columns named in ``keep`` plus ``generated_text``,
    ``generated_tokens`` and ``num_input_tokens``.
    """
    _require_ray("ray.data.llm")
    from ray.data.llm import build_processor

    params = dict(sampling_params or {"temperature": 0.0, "max_tokens": 16})
    kept = tuple(keep)

    def preprocess(row: dict) -> dict:
        return {**row, "sampling_params": params}

    def outputs(row: dict) -> dict:
        tokens = row.get("generated_tokens")
        out = {name: row[name] for name in kept}
        out["generated_text"] = row.get("generated_text") or ""
        out["generated_tokens"] = [int(t) for t in tokens] if tokens is not None else []
        out["num_input_tokens"] = int(row.get("num_input_tokens") or 0)
        return out

    return build_processor(config, preprocess=preprocess, postprocess=postprocess or outputs)


# ---------------------------------------------------------------------------------------
# Online serving: ray.serve.llm
def serve_llm_config(
    model: str,
    *,
    model_id: str = "mesa",
    replicas: int = 1,
    cpus_per_replica: float = 1,
    gpus_per_replica: float = 0,
    engine_kwargs: Mapping[str, Any] | None = None,
    max_model_len: int | None = None,
    mesa: Mapping[str, Any] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    **config: Any,
):
    """A ``ray.serve.llm.LLMConfig``: ``replicas`` mesa engines behind one OpenAI endpoint.

    Use with ``ray.serve.llm.build_openai_app({"llm_configs": [config]})`` and
    ``serve.run(app)``. Clients call it with ``model=model_id``.
    """
    _require_ray("ray.serve.llm")
    from ray.serve.llm import LLMConfig

    kwargs = mesa_engine_kwargs(engine_kwargs, max_model_len=max_model_len, mesa=mesa)
    options: dict[str, Any] = dict(
        model_loading_config={"model_id": model_id, "model_source": str(model)},
        engine_kwargs=kwargs,
        deployment_config={"num_replicas": replicas},
        log_engine_metrics=False,
    )
    if gpus_per_replica:
        options["placement_group_config"] = {
            "bundles": [{"GPU": 1, "CPU": cpus_per_replica}] * int(gpus_per_replica)
        }
    else:
        options["placement_group_config"] = {"bundles": [{"CPU": cpus_per_replica}]}
    if runtime_env is not None:
        options["runtime_env"] = dict(runtime_env)
    options.update(config)
    return LLMConfig(**options)
