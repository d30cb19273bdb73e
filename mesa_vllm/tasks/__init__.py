"""Evaluation tasks for long-context models: prompt builders and scorers, engine-free.

Each task module builds :class:`~mesa_vllm.tasks.base.Sample` objects to a target token length
with a given tokenizer, deterministically from a seed, and scores generated text. Engines, batching
and reporting belong to the callers (``mesa-vllm demo``, ``mesa-vllm eval`` in
:mod:`mesa_vllm.evaluation`).

Tasks (:data:`mesa_vllm.tasks.registry.TASKS`): ``passkey`` (the Mesa-Extrapolation /
Landmark-attention passkey retrieval), the RULER-style needle tasks ``niah_single``,
``niah_multikey``, ``niah_multivalue`` and ``vt`` (:mod:`~mesa_vllm.tasks.needles`), and ``ppl``
(perplexity on Jane Austen's novels, :mod:`~mesa_vllm.tasks.perplexity`).
"""

from mesa_vllm.tasks.base import Sample
from mesa_vllm.tasks.passkey import make_passkey_sample, make_passkey_samples, score_passkey

__all__ = ["Sample", "make_passkey_sample", "make_passkey_samples", "score_passkey"]
