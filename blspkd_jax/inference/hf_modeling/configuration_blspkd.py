"""Configuration of an exported BLSP-KD model (written by `python -m blspkd_jax.export`).

Nested configs: `encoder_config` (a transformers WhisperConfig: the speech encoder and the sizes the
CFormer layers share), `llm_config` (the LLM's own config, Llama/Qwen2/Qwen3/Mistral), plus the
CFormer adapter, the PLoRA settings and the chat prompt the model was trained with.
This file is self-contained (it only needs transformers) so it can ship inside the export.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class BLSPKDConfig(PreTrainedConfig):
    r"""
    encoder_config: WhisperConfig (dict or config) of the speech encoder.
    llm_config: the decoder LLM's config (dict with its `model_type`, or config).
    adapter: CFormer sizes: `num_heads`, `ffn_dim`, `n_pre`, `n_post`, `max_tokens`, `out_norm`,
        `out_norm_eps` (its width is the encoder's `d_model`, its output the LLM's `hidden_size`).
    lora: PLoRA settings `rank`, `alpha`, `dropout`, `targets` (subset of q k v o gate up down);
        rank 0 means no PLoRA.
    pad_to_30s: features are padded to Whisper's 30 s window (True) or kept at the audio's own
        length with a frame mask (False).
    system_prompt: the system turn of the chat prompt (None: no system message).
    default_instruction: text placed before the speech in the user turn when none is given.
    chat_template: the Jinja chat template (None: the tokenizer's own).
    """

    model_type = "blspkd"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        "llm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    encoder_config: dict | PreTrainedConfig | None = None
    llm_config: dict | PreTrainedConfig | None = None
    adapter: dict | None = None
    lora: dict | None = None
    pad_to_30s: bool = False
    sampling_rate: int = 16000
    system_prompt: str | None = None
    default_instruction: str = ""
    chat_template: str | None = None

    def __post_init__(self, **kwargs):
        defaults = {
            "num_heads": None,
            "ffn_dim": None,
            "n_pre": 4,
            "n_post": 4,
            "max_tokens": 256,
            "out_norm": False,
            "out_norm_eps": 1e-6,
        }
        self.adapter = {**defaults, **(self.adapter or {})}
        self.lora = {"rank": 0, "alpha": 16.0, "dropout": 0.0, "targets": [], **(self.lora or {})}
        super().__post_init__(**kwargs)


__all__ = ["BLSPKDConfig"]
