"""Long-context quality harness (``mesa-vllm eval``, ``benchmarks/long_context.py``).

- :mod:`~mesa_vllm.evaluation.grid`: the grid (tasks x methods x lengths x samples), presets.
- :mod:`~mesa_vllm.evaluation.methods`: origin / YaRN / dynamic NTK / mesa as vLLM engine settings.
- :mod:`~mesa_vllm.evaluation.harness`: the plan (what is left, estimated time) and the runner.
- :mod:`~mesa_vllm.evaluation.backends`: offline ``vllm.LLM`` or an OpenAI-compatible endpoint.
- :mod:`~mesa_vllm.evaluation.store`: per-sample JSONL results (resume).
- :mod:`~mesa_vllm.evaluation.report`: summary tables and plots.
- :mod:`~mesa_vllm.evaluation.cost`: time estimates.

Prompt builders and scorers live in :mod:`mesa_vllm.tasks`.
"""
