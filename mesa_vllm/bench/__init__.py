"""``mesa-vllm bench``: prefill, decode and memory of the mesa backend against vLLM's default
CPU attention, side by side in one run, plus the dense oracle at the lengths it reaches.

Layout (engine-free modules first; only ``engine_run``, ``oracle_run`` and ``profile`` import
vLLM or the model, and only in the processes that run them):

- ``config``: the workload and engine settings of a run, and its fingerprint;
- ``plan``: cost model, groups (one fresh engine per backend and length), time budget;
- ``store``: measurements as JSON lines, appended as they finish (a run resumes);
- ``metrics``: per-cell figures from the engine's own per-request timestamps;
- ``summary``: min/median over repetitions, mesa/default ratios, targets, Markdown;
- ``plot``: time vs length for both backends, ratio subplot (PNG);
- ``memory``: peak memory of a process tree (sampled RSS, per-process high-water marks);
- ``engine_run`` / ``oracle_run``: the child processes that measure one group;
- ``profile``: one mesa prefill and one decode window under py-spy and the torch profiler;
- ``cli``: the ``mesa-vllm bench`` command.
"""
