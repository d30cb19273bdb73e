"""Scale-out on Ray: two mesa engine replicas in Ray Data's LLM layer, on a local cluster.

``ray.data.llm`` starts the engines (stock vLLM ``AsyncLLMEngine``s, one per replica; the
mesa plugin loads in each). A batch of prompts far past the trained length goes through two
replicas, and every answer must equal, token for token, what one plain ``vllm.LLM`` with the
same settings gives. Tiny random model (T = 64), fp32, greedy: fast and exact.

The same with ``ray.serve.llm``: two replicas behind one OpenAI endpoint (``slow``: ~1.5 min
more).

Needs ``ray[data,serve]`` (``pip install 'mesa-vllm[ray]'``); skipped without it. Cost here:
~2-2.5 min (Ray start ~10 s, two engines ~40 s each side by side, a reference engine ~30 s).
The local Ray cluster is this module's own (``address="local"``: never someone else's
``ray start``), and ``ray.shutdown()`` stops it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesa_vllm.testing import random_prompt, shutdown_llm

pytestmark = [pytest.mark.cpu, pytest.mark.e2e]

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data.llm")

T = 64
MESA = {"F": 16, "C": 24, "R": 16, "E": 16}
MAX_LEN = 11 * T + 48  # 752 = E * (T - 1 - R), the stair capacity
ENGINE = {"dtype": "float32", "enforce_eager": True, "block_size": 32, "seed": 0,
          "kv_cache_memory_bytes": 64 << 20}
LENGTHS = [90, 130, 200, 260, 330, 410, 500, 580, 650, 700]  # all past T
MAX_TOKENS = 16
REPLICAS = 2


@pytest.fixture(scope="module")
def prompts():
    return [random_prompt(n, seed=100 + i) for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def single_engine_answers(tiny_llama_dir, prompts):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(tiny_llama_dir), attention_backend="mesa", max_model_len=MAX_LEN,
              additional_config={"mesa": MESA}, skip_tokenizer_init=True, **ENGINE)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                detokenize=False)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]
    finally:
        shutdown_llm(llm)
        del llm


@pytest.fixture(scope="module")
def local_ray():
    from mesa_vllm.serving import free_port

    # Both replicas on a small machine: don't let each engine pin its threads to core 0.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    # Logical CPUs: each replica takes 1-2, Ray Data's map tasks and Serve's ingress 1 more.
    context = ray.init(address="local", num_cpus=6, include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=free_port(),
                       log_to_driver=False)
    try:
        yield context
    finally:
        ray.shutdown()


def test_two_replicas_match_single_engine(tiny_llama_dir, prompts, single_engine_answers,
                                          local_ray):
    import ray.data
    from ray.util.state import list_actors, list_tasks

    from mesa_vllm.scaleout import batch_processor_config, build_batch_processor

    # Start both engines before any row flows, and give each one block at a time, so the
    # rows spread over both (a tiny model is so fast that one replica could take them all).
    ray.data.DataContext.get_current().wait_for_min_actors_s = 900
    config = batch_processor_config(
        str(tiny_llama_dir), replicas=REPLICAS, cpus_per_replica=1, tokenized=True,
        batch_size=1, max_concurrent_batches=1, max_tasks_in_flight_per_actor=1,
        engine_kwargs=ENGINE, max_model_len=MAX_LEN, mesa=MESA,
        runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
    )
    assert config.engine_kwargs["attention_backend"] == "mesa"
    assert config.engine_kwargs["distributed_executor_backend"] == "uni"
    processor = build_batch_processor(
        config,
        sampling_params={"temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                         "detokenize": False},
        keep=("idx",),
    )
    rows = [{"idx": i, "tokenized_prompt": p} for i, p in enumerate(prompts)]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    results = sorted(processor(dataset).take_all(), key=lambda r: r["idx"])

    assert [r["idx"] for r in results] == list(range(len(prompts)))
    for result, prompt, want in zip(results, prompts, single_engine_answers, strict=True):
        assert result["num_input_tokens"] == len(prompt) > T
        assert list(result["generated_tokens"]) == want, f"prompt of {len(prompt)} tokens"

    # Two engine replicas existed, and both did work.
    engines = {a.actor_id for a in list_actors(detail=False, limit=1000)
               if "vLLMEngineStageUDF" in (a.class_name or "")}
    assert len(engines) == REPLICAS, engines
    deadline = time.monotonic() + 60  # task events reach the state API with a delay
    while True:
        worked = {t.actor_id for t in list_tasks(detail=False, limit=10000)
                  if t.actor_id in engines and t.name.endswith(".submit")}
        if worked == engines or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert worked == engines, f"only {len(worked)} of {REPLICAS} replicas processed rows"


@pytest.mark.slow
def test_serve_replicas_match_single_engine(tiny_llama_dir, prompts, single_engine_answers,
                                            local_ray):
    """``ray.serve.llm``: two mesa replicas behind one OpenAI-compatible endpoint."""
    from ray import serve
    from ray.serve.llm import build_openai_app

    from mesa_vllm.scaleout import serve_llm_config
    from mesa_vllm.serving import free_port, http_get, http_post_json

    port = free_port()
    config = serve_llm_config(
        str(tiny_llama_dir), model_id="tiny-mesa", replicas=REPLICAS, max_model_len=MAX_LEN,
        mesa=MESA, engine_kwargs={**ENGINE, "skip_tokenizer_init": True},
        runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
    )
    assert config.engine_kwargs["attention_backend"] == "mesa"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
        status = serve.status().applications["default"].deployments
        replicas = status["LLMServer:tiny-mesa"].replica_states
        assert replicas.get("RUNNING") == REPLICAS, replicas

        def ask(prompt):
            code, reply = http_post_json(
                f"http://127.0.0.1:{port}/v1/completions",
                {"model": "tiny-mesa", "prompt": prompt, "max_tokens": MAX_TOKENS,
                 "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                timeout=600,
            )
            assert code == 200, reply
            return reply["choices"][0]["token_ids"]

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, prompts))
        assert answers == single_engine_answers
        assert http_get(f"http://127.0.0.1:{port}/v1/models")[0] == 200
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_two_replicas_passkey_on_smollm2(smollm2_dir, smollm2_tokenizer, local_ray):
    """The embedded model past T through two Ray Data replicas (text in, text out): the same
    answers as one engine, and the keys found (16k prompts, 2x T). ~8 min on 2 cores."""
    import ray.data
    from vllm import LLM, SamplingParams

    from mesa_vllm.scaleout import batch_processor_config, build_batch_processor
    from mesa_vllm.tasks.passkey import make_passkey_sample, score_passkey

    samples = [make_passkey_sample(smollm2_tokenizer, 16000, seed=s) for s in (3, 4, 5, 6)]
    engine = {"enforce_eager": True, "kv_cache_memory_bytes": 3 << 29, "seed": 0}
    llm = LLM(model=str(smollm2_dir), attention_backend="mesa", max_model_len=16384,
              **engine)
    try:
        outputs = llm.generate([s.prompt for s in samples],
                               SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
        want = [out.outputs[0].text for out in outputs]
    finally:
        shutdown_llm(llm)
        del llm

    ray.data.DataContext.get_current().wait_for_min_actors_s = 900
    config = batch_processor_config(
        str(smollm2_dir), replicas=REPLICAS, batch_size=1, engine_kwargs=engine,
        max_model_len=16384, runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
    )
    processor = build_batch_processor(
        config, sampling_params={"temperature": 0.0, "max_tokens": 10}, keep=("idx",))
    rows = [{"idx": i, "prompt": s.prompt} for i, s in enumerate(samples)]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    results = sorted(processor(dataset).take_all(), key=lambda r: r["idx"])

    got = [r["generated_text"] for r in results]
    assert got == want
    for sample, text in zip(samples, got, strict=True):
        assert score_passkey(text, sample.answer), (sample.answer, text)
