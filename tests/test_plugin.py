"""The ``mesa`` plugin is declared to vLLM and runs inside vLLM's own engine processes.

vLLM loads ``vllm.general_plugins`` entry points in the main process, the EngineCore process and
every worker. The observable effect of ``mesa_vllm.register()`` is the ``MESA`` member of
``AttentionBackendEnum``. The engine here uses vLLM's *default* backend, so the member can only
appear in the worker through the entry point, not through backend selection.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points

import pytest

pytestmark = pytest.mark.cpu

GROUP = "vllm.general_plugins"


def _mesa_entry_points():
    return [ep for ep in entry_points(group=GROUP) if ep.name == "mesa"]


def test_entry_point_declared_in_installed_metadata():
    found = _mesa_entry_points()
    assert len(found) == 1, f"expected one `mesa` entry point in {GROUP}, found {found}"
    ep = found[0]
    assert ep.value == "mesa_vllm:register"
    assert ep.dist is not None and ep.dist.metadata["Name"] == "mesa-vllm"

    import mesa_vllm

    assert ep.load() is mesa_vllm.register


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir):
    from vllm import LLM

    from mesa_vllm.testing import shutdown_llm

    with pytest.MonkeyPatch.context() as mp:
        # Default multiprocess mode: main -> EngineCore process -> worker process.
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        # collective_rpc with a function (not a method name) is pickled across processes.
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        mp.delenv("VLLM_PLUGINS", raising=False)  # load every plugin, as users get it
        llm = LLM(model=str(tiny_llama_dir), skip_tokenizer_init=True, enforce_eager=True,
                  max_model_len=64, dtype="float32", kv_cache_memory_bytes=64 << 20)
        yield llm
        shutdown_llm(llm)
        del llm


@pytest.mark.e2e
def test_register_runs_in_worker_processes(tiny_llm):
    from mesa_vllm.testing import worker_plugin_probe

    reports = tiny_llm.collective_rpc(worker_plugin_probe)
    assert reports, "no worker answered"
    for report in reports:
        # It really ran elsewhere: a worker is a child of the EngineCore process, not of us.
        assert report["pid"] != os.getpid()
        assert report["ppid"] != os.getpid()
        assert report["plugins_loaded"], report
        assert report["mesa_registered"], (
            f"vLLM loaded its plugins in worker pid {report['pid']} but MESA is not in "
            f"AttentionBackendEnum there: mesa_vllm.register() did not run or did not register"
        )


@pytest.mark.e2e
def test_register_runs_in_main_process(tiny_llm):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert "MESA" in AttentionBackendEnum.__members__


@pytest.mark.e2e
def test_engine_with_plugin_still_generates(tiny_llm):
    from vllm import SamplingParams

    out = tiny_llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                            SamplingParams(max_tokens=4, temperature=0, detokenize=False),
                            use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
