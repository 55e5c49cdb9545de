"""CTranslate2 Whisper (`model.bin` + `config.json` + `tokenizer.json`) -> a complete Hugging Face
Whisper directory: encoder and decoder weights as safetensors, config, generation config,
tokenizer and feature extractor, loadable by `WhisperForConditionalGeneration` and by our
`hf.load_whisper_encoder`.

The reader is our own because no kept library reads `model.bin` back into arrays (ctranslate2
itself only runs it). Its layout is the one ctranslate2's `specs/model_spec.py` writes: version,
spec name, revision, then named variables (rank, shape, dtype code, byte count, bytes), then
aliases. CTranslate2 fuses self-attention q/k/v into one matrix (Whisper's key has no bias: its
part of the fused bias is zero) and cross-attention k/v into one; `decoder/projection/weight`
aliases the embeddings (Whisper ties them).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

from blspkd_jax.convert.common import check_out
from blspkd_jax.models import hf

# ctranslate2's DataType enum order (include/ctranslate2/types.h).
_CT2_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16)
_SUPPORTED_VERSIONS = range(1, 7)


def read_ct2_model(path: str | Path) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """model.bin -> (spec name, {variable name: array}, {alias: variable name}). A file that is
    not a CTranslate2 model, or ends early, is a CheckpointError naming it."""
    path = Path(path)
    data = path.read_bytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise hf.CheckpointError(
                f"{path}: truncated CTranslate2 model (needs {pos + n} bytes, has {len(data)})"
            )
        pos += n
        return data[pos - n : pos]

    def num(fmt: str) -> int:
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

    def string() -> str:
        raw = take(num("H"))
        if not raw or raw[-1] != 0:
            raise hf.CheckpointError(f"{path}: not a CTranslate2 model (bad string at {pos})")
        return raw[:-1].decode("utf-8", errors="replace")

    version = num("I")
    if version not in _SUPPORTED_VERSIONS:
        raise hf.CheckpointError(
            f"{path}: not a CTranslate2 model.bin (binary version {version}; expected 1-6)"
        )
    name = string() if version >= 2 else ""
    if version >= 2:
        num("I")  # revision
    variables = {}
    for _ in range(num("I")):
        var = string()
        shape = tuple(num("I") for _ in range(num("B")))
        code = num("B") if version >= 4 else 0
        if code >= len(_CT2_DTYPES):
            raise hf.CheckpointError(f"{path}: {var} has an unsupported dtype code {code}")
        nbytes = num("I")
        dtype = np.dtype(_CT2_DTYPES[code])
        if nbytes != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise hf.CheckpointError(f"{path}: {var} holds {nbytes} bytes for shape {shape}")
        variables[var] = np.frombuffer(take(nbytes), dtype).reshape(shape)
    aliases = {string(): string() for _ in range(num("I"))} if version >= 3 else {}
    return name, variables, aliases


def _layers(variables: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in variables if (m := re.match(rf"{prefix}/layer_(\d+)/", k))}
    return max(found) + 1 if found else 0


def hf_state_dict(variables: dict[str, np.ndarray], aliases: dict[str, str]) -> dict:
    """CTranslate2 Whisper variables -> `WhisperForConditionalGeneration` state dict (float32)."""
    v = dict(variables)
    for alias, target in aliases.items():
        v[alias] = v[target]
    out: dict[str, np.ndarray] = {}

    def put(name: str, a) -> None:
        out[name] = np.asarray(a, np.float32)

    def linear(dst: str, src: str, bias: bool = True) -> None:
        put(f"{dst}.weight", v[f"{src}/weight"])
        if bias:
            put(f"{dst}.bias", v[f"{src}/bias"])

    def norm(dst: str, src: str) -> None:
        put(f"{dst}.weight", v[f"{src}/gamma"])
        put(f"{dst}.bias", v[f"{src}/beta"])

    def split(dst: str, names: tuple[str, ...], src: str) -> None:
        """A fused projection (rows stacked in `names` order) -> one linear per name; the key
        has no bias in Whisper."""
        weights = np.split(v[f"{src}/weight"], len(names))
        biases = np.split(v[f"{src}/bias"], len(names))
        for n, w, b in zip(names, weights, biases, strict=True):
            put(f"{dst}.{n}.weight", w)
            if n != "k_proj":
                put(f"{dst}.{n}.bias", b)

    for side in ("encoder", "decoder"):
        m = f"model.{side}"
        put(f"{m}.embed_positions.weight", v[f"{side}/position_encodings/encodings"])
        norm(f"{m}.layer_norm", f"{side}/layer_norm")
        for i in range(_layers(v, side)):
            src, dst = f"{side}/layer_{i}", f"{m}.layers.{i}"
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            split(
                f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"), f"{src}/self_attention/linear_0"
            )
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                split(f"{dst}.encoder_attn", ("k_proj", "v_proj"), f"{src}/attention/linear_1")
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    put("model.decoder.embed_tokens.weight", v["decoder/embeddings/weight"])
    return out


def hf_config(variables: dict[str, np.ndarray], ct2_config: dict) -> dict:
    """The Hugging Face WhisperConfig (as a dict) the variables' shapes describe."""
    emb = variables["decoder/embeddings/weight"]
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": int(emb.shape[0]),
        "d_model": int(emb.shape[1]),
        "num_mel_bins": int(variables["encoder/conv1/weight"].shape[1]),
        "encoder_layers": _layers(variables, "encoder"),
        "decoder_layers": _layers(variables, "decoder"),
        "encoder_attention_heads": int(variables["encoder/num_heads"]),
        "decoder_attention_heads": int(variables["decoder/num_heads"]),
        "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(variables["decoder/position_encodings/encodings"].shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "pad_token_id": 50256,
        "bos_token_id": 50257,
        "eos_token_id": 50256,
        "decoder_start_token_id": 50257,
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin", [220, 50256])),
        "torch_dtype": "float32",
    }


def generation_config(config: dict, ct2_config: dict, tokenizer) -> dict:
    """Whisper's generation settings: English-only models transcribe without a language or task
    token, multilingual ones carry the language and task maps."""
    multilingual = config["vocab_size"] >= 51865
    ids = tokenizer.convert_tokens_to_ids
    gen = {
        "decoder_start_token_id": 50257,
        "bos_token_id": 50257,
        "eos_token_id": 50256,
        "pad_token_id": 50256,
        "max_length": config["max_target_positions"],
        "suppress_tokens": config["suppress_tokens"],
        "begin_suppress_tokens": config["begin_suppress_tokens"],
        "alignment_heads": ct2_config.get("alignment_heads", []),
        "is_multilingual": multilingual,
        "no_timestamps_token_id": ids("<|notimestamps|>"),
        "prev_sot_token_id": ids("<|startofprev|>"),
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
    }
    if multilingual:
        lang_ids = ct2_config.get("lang_ids", [])
        gen["lang_to_id"] = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}
        gen["task_to_id"] = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
    else:
        gen["forced_decoder_ids"] = [[1, ids("<|notimestamps|>")]]
    return gen


def convert(src: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """CTranslate2 Whisper directory `src` -> Hugging Face Whisper directory `out` (written
    beside it and moved into place whole)."""
    check_out(Path(out), force)  # before the seconds of reading the model
    src = Path(src)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (src / name).is_file():
            raise hf.CheckpointError(
                f"{src / name}: not found (a CTranslate2 Whisper directory holds model.bin, "
                "config.json and tokenizer.json)"
            )
    spec, variables, aliases = read_ct2_model(src / "model.bin")
    if spec != "WhisperSpec":
        raise hf.CheckpointError(f"{src / 'model.bin'}: a CTranslate2 {spec}, not a WhisperSpec")
    ct2_config = json.loads((src / "config.json").read_text())
    config = hf_config(variables, ct2_config)
    state = hf_state_dict(variables, aliases)
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(src / "tokenizer.json"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    gen = generation_config(config, ct2_config, tokenizer)
    features = WhisperFeatureExtractor(feature_size=config["num_mel_bins"])
    with hf.atomic_directory(out) as tmp:
        hf.write_config(tmp, config)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        hf.write_state_dict(tmp, state)
        tokenizer.save_pretrained(tmp)
        features.save_pretrained(tmp)
    return Path(out)
