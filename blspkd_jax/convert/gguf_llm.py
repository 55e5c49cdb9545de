"""GGUF (llama.cpp) Llama-family LLM -> a Hugging Face directory: config, safetensors (float32,
de-quantised), tokenizer with its chat template and generation config.

Tensors are read and de-quantised with the `gguf` package (llama.cpp's own reader); the name map
and the undoing of llama.cpp's rotary permutation of q and k are ours, so that transformers' own
GGUF loader stays an independent reference in the tests. The tokenizer is rebuilt from the GGUF
metadata by transformers (its GGUF tokenizer converter).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize
from transformers import AutoTokenizer

from blspkd_jax.convert.common import check_out
from blspkd_jax.models import hf

_ARCHITECTURES = ("llama",)  # what the name map below describes
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _reader(path: Path):
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise hf.CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key: str, path: Path, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise hf.CheckpointError(f"{path}: GGUF metadata lacks {key}")
        return default
    return field.contents()


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it interleaves each head's two rotary halves):
    [heads * head_dim, d] rows (h, i, half) -> (h, half, i)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader, path: Path) -> dict:
    """The Hugging Face LlamaConfig (as a dict) of a GGUF file's metadata."""
    arch = _field(reader, "general.architecture", path)
    if arch not in _ARCHITECTURES:
        raise hf.CheckpointError(
            f"{path}: GGUF architecture {arch!r}; expected one of {_ARCHITECTURES}"
        )
    a = lambda key, default=None: _field(reader, f"{arch}.{key}", path, default)  # noqa: E731
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    tok = lambda key: int(_field(reader, f"tokenizer.ggml.{key}", path, -1))  # noqa: E731
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(a("vocab_size", vocab)),
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": int(a("rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(a("context_length")),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(a("rope.freq_base", 10000.0)),
        },
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": tok("bos_token_id"),
        "eos_token_id": tok("eos_token_id"),
        "pad_token_id": tok("padding_token_id"),
        "torch_dtype": "float32",
    }


def read_state_dict(reader, config: dict, path: Path) -> dict[str, np.ndarray]:
    """De-quantised float32 tensors under `LlamaForCausalLM` names."""
    out = {}
    for t in reader.tensors:
        if t.name in _TOP_MAP:
            name = _TOP_MAP[t.name]
        else:
            block, _, rest = t.name.partition(".")[2].partition(".")
            if not t.name.startswith("blk.") or rest not in _LAYER_MAP:
                raise hf.CheckpointError(f"{path}: unexpected tensor {t.name} for a Llama model")
            name = f"model.layers.{block}.{_LAYER_MAP[rest]}"
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions fastest first
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        out[name] = w
    expected = 2 + 9 * config["num_hidden_layers"] + (not config["tie_word_embeddings"])
    if len(out) != expected:
        raise hf.CheckpointError(f"{path}: {len(out)} tensors; a complete model has {expected}")
    return out


def convert(src: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """GGUF file `src` -> Hugging Face directory `out` (written beside it, moved in whole)."""
    check_out(Path(out), force)  # before the seconds of reading and de-quantising
    src = Path(src)
    if not src.is_file():
        raise hf.CheckpointError(f"{src}: not found (expected a .gguf file)")
    reader = _reader(src)
    config = read_config(reader, src)
    state = read_state_dict(reader, config, src)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    template = _field(reader, "tokenizer.chat_template", src, "")
    if template:
        tokenizer.chat_template = template
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] >= 0}
    with hf.atomic_directory(out) as tmp:
        hf.write_config(tmp, config)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        hf.write_state_dict(tmp, state)
        tokenizer.save_pretrained(tmp)
    return Path(out)
