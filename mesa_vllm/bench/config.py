"""The workload and engine settings of a benchmark run (engine-free).

Everything that changes a measurement goes into :meth:`BenchConfig.fingerprint`; a stored row
whose fingerprint differs from the current run's is not reused (it measured something else).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field

BACKENDS = ("mesa", "default")
# scenario name -> concurrent requests
SCENARIOS = {"single": 1, "batch4": 4}
# Bytes per element of the KV cache dtype.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

GIB = 1 << 30


def parse_length(text: str | int) -> int:
    """``"16k"`` -> 16384, ``"2048"`` -> 2048, ``"1.5k"`` -> 1536."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([km]?)", s)
    if not match:
        raise ValueError(f"not a length: {text!r} (use e.g. 8192, 8k, 64k)")
    number = float(match.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[match.group(2)]
    if number != int(number) or number < 1:
        raise ValueError(f"not a whole positive length: {text!r}")
    return int(number)


def parse_lengths(text: str) -> list[int]:
    return sorted({parse_length(part) for part in str(text).split(",") if part.strip()})


def format_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def parse_reps_at(text: str | None) -> dict[int, int]:
    """``"32k=2,64k=1"`` -> ``{32768: 2, 65536: 1}``."""
    out: dict[int, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"--reps-at entries are LENGTH=REPS, got {part!r}")
        length, reps = part.split("=", 1)
        count = int(reps)
        if count < 0:
            raise ValueError(f"repetitions must be >= 0, got {part!r}")
        out[parse_length(length)] = count
    return out


def parse_duration(text: str | float | None) -> float | None:
    """``"8h"``, ``"90m"``, ``"45s"``, ``"1h30m"`` or plain seconds -> seconds (None: no limit)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or "".join(n + u for n, u in parts) != s.replace(" ", ""):
        raise ValueError(f"not a duration: {text!r} (use e.g. 8h, 90m, 1h30m, 3600)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about the model (read from its config.json)."""

    trained_len: int = 8192
    num_layers: int = 30
    num_kv_heads: int = 3
    head_dim: int = 64
    num_heads: int = 9

    def kv_bytes_per_token(self, backend: str, dtype: str = "bfloat16") -> int:
        """Expected KV bytes per token over all layers: K and V; mesa adds the stair plane."""
        planes = 3 if backend == "mesa" else 2
        return self.num_layers * self.num_kv_heads * self.head_dim * planes * DTYPE_BYTES[dtype]

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        heads = int(config.get("num_attention_heads", 9))
        head_dim = config.get("head_dim") or config.get("hidden_size", 64 * heads) // heads
        return cls(
            trained_len=int(config.get("max_position_embeddings", 8192)),
            num_layers=int(config.get("num_hidden_layers", 30)),
            num_kv_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=int(head_dim),
            num_heads=heads,
        )


@dataclass(frozen=True)
class BenchConfig:
    lengths: tuple[int, ...] = (8192, 16384, 32768, 65536)
    backends: tuple[str, ...] = BACKENDS
    scenarios: tuple[str, ...] = ("single", "batch4")
    reps: int = 3
    reps_at: dict = field(default_factory=dict)  # length -> repetitions
    # Lengths at which the batch-of-4 scenario runs (None: all lengths).
    batch_lengths: tuple[int, ...] | None = None
    decode_tokens: int = 64
    warmup_tokens: int = 1024
    max_model_len: int | None = None  # None: longest length + generated tokens, rounded up
    max_num_batched_tokens: int = 8192
    block_size: int = 128
    dtype: str = "bfloat16"
    kv_cache_gib: int | None = None  # None: enough for the largest cell of the larger backend
    compile: bool = False  # False: enforce_eager=True for both backends
    mesa: dict = field(default_factory=dict)  # overrides of F, C, R, E, log_n
    # The dense oracle is slow (float64, explicit rotation per pair): ~4 min at 512 tokens on a
    # busy 2-core machine, quadratic. vLLM is measured at these lengths too (single request).
    oracle_lengths: tuple[int, ...] = (512, 1024, 2048)
    oracle_reps: int = 1
    oracle_decode_tokens: int = 8
    oracle_dtype: str = "bfloat16"
    oracle_threads: int | None = None  # None: the oracle's own choice (1 thread for small models)
    seed: int = 0
    model_name: str = "SmolLM2-135M-Instruct"

    # -- derived -----------------------------------------------------------------------
    def reps_for(self, length: int) -> int:
        return int(self.reps_at.get(length, self.reps))

    def vllm_lengths(self) -> list[int]:
        """Lengths vLLM is measured at: ``lengths`` plus the oracle's (for the comparison)."""
        return sorted(set(self.lengths) | set(self.oracle_lengths))

    def scenarios_for(self, length: int) -> list[str]:
        if length not in self.lengths:  # only there to compare with the oracle
            return ["single"] if "single" in self.scenarios else list(self.scenarios[:1])
        out = []
        for scenario in self.scenarios:
            if scenario != "single" and self.batch_lengths is not None \
                    and length not in self.batch_lengths:
                continue
            out.append(scenario)
        return out

    def batch_extra_tokens(self, length: int, n_requests: int) -> int:
        """Extra tokens for a batch so that every request decodes together for
        ``decode_tokens`` steps: the first request's tokens while the others still prefill
        (about one per prefill chunk of each later request)."""
        if n_requests <= 1:
            return 0
        chunks = math.ceil(length / self.max_num_batched_tokens)
        return (n_requests - 1) * (chunks + 1) + 2

    def max_tokens(self, length: int, n_requests: int) -> int:
        """``max_tokens`` of each request: the first token plus ``decode_tokens`` decode steps."""
        return 1 + self.decode_tokens + self.batch_extra_tokens(length, n_requests)

    def resolved_max_model_len(self) -> int:
        if self.max_model_len:
            return int(self.max_model_len)
        longest = max(self.vllm_lengths(), default=0)
        need = max(
            [longest + self.max_tokens(longest, SCENARIOS[s]) for s in self.scenarios_for(longest)]
            or [longest + 1 + self.decode_tokens]
        )
        return -(-need // 256) * 256

    def kv_tokens_needed(self) -> int:
        """KV slots the largest cell holds at once (all its requests at their full length)."""
        best = 0
        for length in self.vllm_lengths():
            for scenario in self.scenarios_for(length):
                n = SCENARIOS[scenario]
                best = max(best, n * (length + self.max_tokens(length, n)))
        best = max(best, self.warmup_tokens + 16)
        return best

    def resolved_kv_cache_gib(self, shape: ModelShape) -> int:
        """The KV pool both backends get (whole GiB, as ``VLLM_CPU_KVCACHE_SPACE`` takes):
        the largest cell (or one ``max_model_len`` request, if more) of the backend with the
        most bytes per token, plus 5% and a block per request of slack."""
        if self.kv_cache_gib:
            return int(self.kv_cache_gib)
        per_token = max(shape.kv_bytes_per_token(b, self.dtype) for b in self.backends)
        # vLLM refuses a pool that cannot hold one request of max_model_len.
        tokens = max(self.kv_tokens_needed(), self.resolved_max_model_len()) + 4 * self.block_size
        return max(1, math.ceil(tokens * per_token * 1.05 / GIB))

    def engine_settings(self, shape: ModelShape) -> dict:
        """Settings both backends share (recorded with every row)."""
        return {
            "max_model_len": self.resolved_max_model_len(),
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "block_size": self.block_size,
            "dtype": self.dtype,
            "kv_cache_gib": self.resolved_kv_cache_gib(shape),
            "enforce_eager": not self.compile,
            "enable_prefix_caching": False,
        }

    def fingerprint(self, shape: ModelShape) -> str:
        """Hash of what changes a vLLM measurement (not the lengths or repetitions)."""
        payload = {
            "engine": self.engine_settings(shape),
            "decode_tokens": self.decode_tokens,
            "mesa": dict(sorted(self.mesa.items())),
            "seed": self.seed,
            "model": self.model_name,
            "warmup_tokens": self.warmup_tokens,
        }
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def oracle_fingerprint(self, shape: ModelShape) -> str:
        payload = {
            "max_model_len": self.resolved_max_model_len(),
            "decode_tokens": self.oracle_decode_tokens,
            "dtype": self.oracle_dtype,
            "threads": self.oracle_threads,
            "mesa": dict(sorted(self.mesa.items())),
            "seed": self.seed,
            "model": self.model_name,
        }
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reps_at"] = {str(k): v for k, v in self.reps_at.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BenchConfig:
        d = dict(d)
        for key in ("lengths", "backends", "scenarios", "oracle_lengths"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        if d.get("batch_lengths") is not None:
            d["batch_lengths"] = tuple(d["batch_lengths"])
        d["reps_at"] = {int(k): int(v) for k, v in (d.get("reps_at") or {}).items()}
        return cls(**d)


def prompt_seed(length: int, rep: int, index: int, base: int = 0) -> int:
    """Seed of one prompt: same for every backend (fair), distinct per repetition and request
    (no prefix-cache hits even with caching on)."""
    return base * 1_000_003 + length * 1000 + rep * 10 + index
