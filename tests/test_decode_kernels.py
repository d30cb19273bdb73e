"""The decode-kernel benchmark's checks: every kernel it times must agree with float64."""

import pytest

from mesa_vllm.bench import kernels

pytestmark = pytest.mark.cpu


def test_every_decode_kernel_matches_the_float64_reference():
    report = kernels.measure(length=1000, window=100, reps=1)
    names = [t.name for t in report.timings]
    isas = ["vec", "amx"] if kernels.amx_available() else ["vec"]
    expected = [f"vllm {isa}{s}" for isa in isas for s in ("", " split")]
    assert names[: len(expected)] == expected
    assert "sglang paged decode (mesa stair pass)" in names
    checked = [t for t in report.timings if t.max_abs_error is not None]
    assert len(checked) == len(expected) + 1
    assert all(t.max_abs_error <= kernels.OUTPUT_TOLERANCE for t in checked)
    assert all(t.ms_per_layer > 0 for t in report.timings)
    md = kernels.to_markdown(report, "cmd")
    assert "| sglang paged decode (mesa stair pass) |" in md and "```sh\ncmd\n```" in md


def test_decode_kernel_benchmark_refuses_a_window_outside_the_sequence():
    with pytest.raises(ValueError, match="window must be in"):
        kernels.measure(length=256, window=256, reps=1)
