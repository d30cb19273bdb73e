"""Where prompts go: an offline vLLM engine (``LLM.generate`` on a batch) or any
OpenAI-compatible completions endpoint (e.g. a running ``vllm serve``).

Both take token-id prompts built locally and return, per sample, either the generated text
(greedy) or per-token prompt log-probabilities (perplexity). Prompts are sent as token ids, so the
length is exactly what the task built; ``prompt_mode="text"`` sends the prompt text instead (for
servers that do not accept token-id prompts; lengths then depend on the server's tokenizer).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mesa_vllm.engine import allow_long_steps
from mesa_vllm.evaluation.methods import EngineConfig
from mesa_vllm.tasks.base import Sample


class OfflineEngine:
    """One ``vllm.LLM`` built from an :class:`EngineConfig`; batches go through ``LLM.generate``."""

    backend_name = "vllm"

    def __init__(self, model: str, config: EngineConfig, *, kv_cache_bytes: int,
                 enforce_eager: bool = True, seed: int = 0, prefix_caching: bool = True,
                 extra_kwargs: dict | None = None):
        if config.infeasible:
            raise ValueError(f"cannot build an infeasible engine: {config.infeasible}")
        os.environ.update({k: str(v) for k, v in config.env.items()})
        allow_long_steps()  # origin at 64k: one prefill step outlasts vLLM's 300 s timeout
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "max_model_len": config.max_model_len,
            "kv_cache_memory_bytes": int(kv_cache_bytes),
            "enforce_eager": enforce_eager,
            "seed": seed,
            "enable_prefix_caching": prefix_caching,
        }
        kwargs.update(config.llm_kwargs)
        kwargs.update(extra_kwargs or {})
        start = time.monotonic()
        self.llm = LLM(model=model, **kwargs)
        self.start_seconds = time.monotonic() - start

    def generate(self, samples: list[Sample], max_new_tokens: int) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s.token_ids) for s in samples], params, use_tqdm=False
        )
        results = []
        for out in outputs:
            completion = out.outputs[0]
            results.append({
                "output": completion.text,
                "gen_tokens": len(completion.token_ids),
                "finish_reason": completion.finish_reason,
                "cached_tokens": out.num_cached_tokens or 0,
            })
        return results

    def logprobs(self, samples: list[Sample]) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0,
                                detokenize=False)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s.token_ids) for s in samples], params, use_tqdm=False
        )
        results = []
        for sample, out in zip(samples, outputs):
            lps: list[float | None] = [None]
            for i, token in enumerate(sample.token_ids[1:], start=1):
                entry = out.prompt_logprobs[i] if out.prompt_logprobs else None
                lps.append(entry[token].logprob if entry and token in entry else None)
            results.append({"token_logprobs": lps, "cached_tokens": out.num_cached_tokens or 0,
                            "gen_tokens": 1})
        return results

    def close(self) -> None:
        from mesa_vllm.llm_utils import shutdown_llm

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_llm(llm)
            del llm


def normalise_base_url(url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1`` (or ``.../v1/completions``) -> ``.../v1``."""
    url = url.rstrip("/")
    for suffix in ("/completions", "/chat/completions"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url if url.endswith("/v1") else url + "/v1"


class EndpointError(RuntimeError):
    pass


class EndpointClient:
    """An OpenAI-compatible ``/v1/completions`` server, ``concurrency`` requests at a time."""

    backend_name = "endpoint"

    def __init__(self, url: str, model: str | None = None, *, api_key: str | None = None,
                 prompt_mode: str = "tokens", timeout: float = 3600.0, concurrency: int = 4):
        if prompt_mode not in ("tokens", "text"):
            raise ValueError(f"prompt_mode must be 'tokens' or 'text', got {prompt_mode!r}")
        self.base = normalise_base_url(url)
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.prompt_mode = prompt_mode
        self.timeout = timeout
        self.concurrency = max(1, int(concurrency))
        self.start_seconds = 0.0
        self.model = model or self._first_model()

    # -- HTTP ------------------------------------------------------------------------------
    def _request(self, path: str, payload: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=headers,
                                         method="POST" if payload is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")[:1000]
            raise EndpointError(f"HTTP {error.code} from {self.base + path}: {body}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise EndpointError(f"cannot reach {self.base + path}: {error}") from None

    def _first_model(self) -> str:
        listing = self._request("/models")
        models = [m.get("id") for m in listing.get("data", []) if m.get("id")]
        if not models:
            raise EndpointError(f"{self.base}/models lists no model; pass --endpoint-model")
        return models[0]

    def _prompt(self, sample: Sample):
        return list(sample.token_ids) if self.prompt_mode == "tokens" else sample.prompt

    def _map(self, fn, samples: list[Sample]) -> list[dict]:
        def guarded(sample):
            start = time.monotonic()
            try:
                result = fn(sample)
            except EndpointError as error:
                result = {"error": str(error)}
            result["seconds"] = time.monotonic() - start
            return result

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(samples) or 1)) as pool:
            return list(pool.map(guarded, samples))

    # -- the two operations ----------------------------------------------------------------
    def generate(self, samples: list[Sample], max_new_tokens: int) -> list[dict]:
        def one(sample: Sample) -> dict:
            body = self._request("/completions", {
                "model": self.model, "prompt": self._prompt(sample), "max_tokens": max_new_tokens,
                "temperature": 0.0,
            })
            choice = (body.get("choices") or [{}])[0]
            usage = body.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            return {
                "output": choice.get("text", ""),
                "gen_tokens": usage.get("completion_tokens", 0),
                "finish_reason": choice.get("finish_reason"),
                "cached_tokens": details.get("cached_tokens") or 0,
                "server_prompt_tokens": usage.get("prompt_tokens"),
            }

        return self._map(one, samples)

    def logprobs(self, samples: list[Sample]) -> list[dict]:
        def one(sample: Sample) -> dict:
            body = self._request("/completions", {
                "model": self.model, "prompt": self._prompt(sample), "max_tokens": 1,
                "temperature": 0.0, "echo": True, "logprobs": 0,
            })
            choice = (body.get("choices") or [{}])[0]
            values = (choice.get("logprobs") or {}).get("token_logprobs")
            if not values:
                raise EndpointError("the endpoint returned no prompt logprobs for echo=true; "
                                    "perplexity needs echo + logprobs support")
            n = len(sample.token_ids) if self.prompt_mode == "tokens" else len(values) - 1
            lps = [None] + [None if v is None else float(v) for v in values[1:n]]
            return {"token_logprobs": lps, "gen_tokens": 1}

        return self._map(one, samples)

    def close(self) -> None:
        pass
