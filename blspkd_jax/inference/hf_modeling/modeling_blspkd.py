"""BLSP-KD in PyTorch, as exported by `python -m blspkd_jax.export`: the transformers Whisper
encoder, the CFormer adapter (Whisper layers, CIF, projections), and the transformers LLM with
PLoRA, plus `generate_from_audio` for greedy responses to 16 kHz audio.

Self-contained (torch, numpy and transformers only) so that it ships inside the export and loads
with `AutoModel.from_pretrained(DIR, trust_remote_code=True)`. It mirrors the JAX model exactly:
same masking, the same inference-mode CIF (docs/method.md §3, closed form), PLoRA kept unmerged and
switched on only at speech positions of the prompt (never while decoding).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder, WhisperEncoderLayer
from transformers.utils import ModelOutput

from .configuration_blspkd import BLSPKDConfig

HOP = 160  # Whisper's STFT hop: 100 mel frames per second at 16 kHz
TRANSCRIPT_MARK = "<<TRANSCRIPT>>"
RESPONSE_MARK = "<<RESPONSE>>"
# PLoRA target name -> (submodule of a decoder layer, linear layer inside it).
LORA_SITES = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
# Below this total firing weight an utterance has nothing to integrate (as the JAX CIF).
MIN_TOTAL = 1e-6


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key mask [B, S] (True = attend) -> additive [B, 1, 1, S] for Whisper attention layers."""
    fill = torch.finfo(dtype).min
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, fill)[
        :, None, None, :
    ]


def cif_inference(values, alphas, frame_mask, max_tokens, target_lengths=None):
    """Continuous integrate-and-fire with threshold 1, in closed form.

    values [B, T, C], alphas [B, T] (>= 0), frame_mask [B, T] bool -> (tokens [B, N, C],
    token_mask [B, N]) with N the largest token count in the batch (at most `max_tokens`).
    n = max(1, round(sum alpha)) (inference) or `target_lengths`; alphas are rescaled to sum to n;
    with c_t the cumulative weight, token k takes max(0, min(c_t, k+1) - max(c_{t-1}, k)) of frame
    t (no upper bound for the last token). Computed in float64, returned in values' dtype.
    """
    a = torch.where(frame_mask, alphas.double(), 0.0).clamp_min(0.0)
    total = a.sum(-1)
    if target_lengths is None:
        n = torch.round(total).clamp_min(1).long()
    else:
        n = target_lengths.long().clamp_min(0)
    ok = total > MIN_TOTAL
    a = torch.where(ok[:, None], a * (n.double() / torch.where(ok, total, 1.0))[:, None], 0.0)
    c = torch.cumsum(a, -1)
    prev = torch.nn.functional.pad(c[:, :-1], (1, 0))
    kept = n.clamp_max(max_tokens)
    N = max(int(kept.max()), 1)
    k = torch.arange(N, dtype=torch.float64, device=a.device)[None, :, None]
    upper = torch.where(k == (n - 1).double()[:, None, None], torch.inf, k + 1)
    w = (torch.minimum(c[:, None, :], upper) - torch.maximum(prev[:, None, :], k)).clamp_min(0)
    tokens = torch.einsum("bnt,btc->bnc", w, values.double())
    token_mask = torch.arange(N, device=a.device)[None, :] < kept[:, None]
    tokens = torch.where(token_mask[..., None], tokens, 0.0)
    return tokens.to(values.dtype), token_mask


class RMSNorm(nn.Module):
    """RMSNorm with statistics in float32 (the CFormer's optional norm before out_proj)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * xf.to(x.dtype)


class CFormer(nn.Module):
    """Encoder output [B, T, D] -> speech tokens [B, N, H], one per CIF token.

    n_pre Whisper layers (padding masked), alpha = sigmoid(last channel), CIF over the other D-1
    channels, cif_proj (D-1 -> D), n_post Whisper layers (token padding masked), optional RMSNorm,
    out_proj (D -> H). Padded token slots are zero.
    """

    def __init__(self, config: BLSPKDConfig):
        super().__init__()
        enc, a = config.encoder_config, config.adapter
        layer_cfg = copy.deepcopy(enc)
        layer_cfg.encoder_attention_heads = a["num_heads"] or enc.encoder_attention_heads
        layer_cfg.encoder_ffn_dim = a["ffn_dim"] or enc.encoder_ffn_dim
        layer_cfg.dropout = layer_cfg.attention_dropout = layer_cfg.activation_dropout = 0.0
        D, H = enc.d_model, config.llm_config.hidden_size
        self.max_tokens = int(a["max_tokens"])
        self.pre_layers = nn.ModuleList(WhisperEncoderLayer(layer_cfg) for _ in range(a["n_pre"]))
        self.cif_proj = nn.Linear(D - 1, D)
        self.post_layers = nn.ModuleList(WhisperEncoderLayer(layer_cfg) for _ in range(a["n_post"]))
        self.out_norm = RMSNorm(D, a["out_norm_eps"]) if a["out_norm"] else None
        self.out_proj = nn.Linear(D, H)

    def forward(self, h, frame_mask, target_lengths=None):
        x = h
        mask = _additive_mask(frame_mask, x.dtype)
        for layer in self.pre_layers:
            x = layer(x, mask)
        # The firing weight in float32 whatever the compute dtype (as the JAX model).
        alphas = torch.where(frame_mask, torch.sigmoid(x[..., -1].float()), 0.0)
        tokens, token_mask = cif_inference(
            x[..., :-1], alphas, frame_mask, self.max_tokens, target_lengths
        )
        y = self.cif_proj(tokens)
        mask = _additive_mask(token_mask, y.dtype)
        for layer in self.post_layers:
            y = layer(y, mask)
        if self.out_norm is not None:
            y = self.out_norm(y)
        y = self.out_proj(y)
        return torch.where(token_mask[..., None], y, 0.0), token_mask, alphas


class PLoRA(nn.Module):
    """The low-rank branch `B A dropout(x) * alpha / r` of one LLM linear layer (kept unmerged)."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank

    def forward(self, x):
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scale


class _PLoRASwitch:
    """The per-position PLoRA mask [B, L] shared by every hook; None = base LLM exactly.

    `rows = True` computes each branch at the mask's positions only (boolean indexing: shapes
    that change with the batch, for eager training) instead of at every position and then
    selecting; the outputs are the same."""

    def __init__(self):
        # Instance attributes from the start: torch.compile guards on this object's __dict__,
        # and a first assignment after tracing would force a recompile.
        self.mask: torch.Tensor | None = None
        self.rows = False


@dataclass
class BLSPKDOutput(ModelOutput):
    """logits [B, L, V]; speech_embeds [B, N, H] and speech_token_mask [B, N] from the CFormer;
    alphas [B, T] (the CIF firing weights); cache: the LLM's KV cache when use_cache."""

    logits: torch.Tensor | None = None
    cache: object | None = None
    speech_embeds: torch.Tensor | None = None
    speech_token_mask: torch.Tensor | None = None
    alphas: torch.Tensor | None = None


class BLSPKDPreTrainedModel(PreTrainedModel):
    config_class = BLSPKDConfig
    base_model_prefix = "blspkd"
    main_input_name = "input_features"
    supports_gradient_checkpointing = False
    _supports_sdpa = True


class BLSPKDModel(BLSPKDPreTrainedModel):
    """Whisper encoder -> CFormer -> LLM with PLoRA at speech positions.

    State dict: `encoder.*` (transformers WhisperEncoder names), `adapter.*`, `llm.*` (the
    transformers causal LM, `lm_head` included unless tied) and `llm_lora.*` (PLoRA, PEFT-style
    `lora_A`/`lora_B` per targeted linear layer).
    """

    def __init__(self, config: BLSPKDConfig):
        super().__init__(config)
        self.encoder = WhisperEncoder(config.encoder_config)
        self.adapter = CFormer(config)
        self.llm = AutoModelForCausalLM.from_config(config.llm_config)
        self._plora = _PLoRASwitch()
        lora = config.lora
        self.llm_lora = None
        if lora["rank"]:
            layers = nn.ModuleList()
            for block in self.llm.model.layers:
                sites = nn.ModuleDict()
                for target in lora["targets"]:
                    part, name = LORA_SITES[target]
                    base = getattr(getattr(block, part), name)
                    branch = PLoRA(
                        base.in_features,
                        base.out_features,
                        lora["rank"],
                        lora["alpha"],
                        lora["dropout"],
                    )
                    if part not in sites:
                        sites[part] = nn.ModuleDict()
                    sites[part][name] = branch
                    base.register_forward_hook(self._lora_hook(branch))
                layers.append(sites)
            self.llm_lora = nn.Module()
            self.llm_lora.layers = layers
        self._tokenizer = None
        self.post_init()

    def _lora_hook(self, branch: PLoRA):
        switch = self._plora

        def hook(module, args, output):
            mask = switch.mask
            if mask is None:
                return output
            if switch.rows:
                return output.index_put((mask,), output[mask] + branch(args[0][mask]))
            # where(), not a product: a position with the switch off gets exactly W x + b.
            return torch.where(mask[..., None], output + branch(args[0]), output)

        return hook

    # -- the three parts ---------------------------------------------------------------------

    def encode(self, input_features, feature_mask=None):
        """log-mel [B, n_mels, F] -> encoder states [B, ceil(F/2), D].

        30 s mode: transformers' WhisperEncoder as is (F must be 3000). Variable length: the same
        modules over F frames, position table sliced, padding frames (feature_mask False) zeroed
        before each convolution and hidden as attention keys.
        """
        enc = self.encoder
        if self.config.pad_to_30s:
            return enc(input_features.to(enc.conv1.weight.dtype)).last_hidden_state
        if input_features.shape[-1] > 2 * enc.config.max_source_positions:
            raise ValueError(
                f"input_features has {input_features.shape[-1]} frames; at most "
                f"{2 * enc.config.max_source_positions} (30 s) fit the encoder"
            )
        x = input_features.to(enc.conv1.weight.dtype)
        fm = None if feature_mask is None else feature_mask.bool()[:, None, :]
        if fm is not None:
            x = x * fm
        x = nn.functional.gelu(enc.conv1(x))
        if fm is not None:
            x = x * fm
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        mask = None if fm is None else _additive_mask(fm[:, 0, ::2], x.dtype)
        for layer in enc.layers:
            x = layer(x, mask)
        return enc.layer_norm(x)

    def encode_speech(self, input_features, feature_mask=None, target_lengths=None):
        """log-mel -> (speech tokens [B, N, H], token mask [B, N], alphas [B, T]).

        `feature_mask [B, F]` marks the real mel frames (None: all); `target_lengths [B]` cuts
        exactly that many tokens (the training mode), None gives max(1, round(sum alpha)).
        """
        if feature_mask is None:
            B, _, F = input_features.shape
            feature_mask = torch.ones(B, F, dtype=torch.bool, device=input_features.device)
        h = self.encode(input_features, feature_mask)
        frame_mask = feature_mask.bool()[:, ::2].to(h.device)
        return self.adapter(h, frame_mask, target_lengths)

    def forward(
        self,
        input_features=None,
        feature_mask=None,
        input_ids=None,
        attention_mask=None,
        speech_mask=None,
        target_lengths=None,
        inputs_embeds=None,
        lora_mask=None,
        position_ids=None,
        cache=None,
        use_cache=False,
        **kwargs,
    ) -> BLSPKDOutput:
        """The student: `input_ids [B, L]` whose `speech_mask` positions are replaced, in order,
        by the speech tokens cut from `input_features` (the k-th True of row b takes token k), then
        the LLM with PLoRA on at those positions. Or `inputs_embeds` and `lora_mask` directly.
        Positions are `cumsum(attention_mask) - 1` (right or left padding both work).
        """
        speech = {}
        if input_features is not None:
            tokens, token_mask, alphas = self.encode_speech(
                input_features, feature_mask, target_lengths
            )
            speech = dict(speech_embeds=tokens, speech_token_mask=token_mask, alphas=alphas)
            if input_ids is None:
                return BLSPKDOutput(**speech)
            if speech_mask is None:
                raise ValueError("forward: speech_mask [B, L] must mark where the speech goes")
            text = self.llm.get_input_embeddings()(input_ids)
            rank = (torch.cumsum(speech_mask.long(), -1) - 1).clamp(0, tokens.shape[1] - 1)
            gathered = torch.take_along_dim(tokens, rank[..., None], dim=1).to(text.dtype)
            inputs_embeds = torch.where(speech_mask.bool()[..., None], gathered, text)
            lora_mask = speech_mask
            input_ids = None
        if attention_mask is not None and position_ids is None and cache is None:
            position_ids = (torch.cumsum(attention_mask.long(), -1) - 1).clamp_min(0)
        out = self.run_llm(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            lora_mask=lora_mask,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return BLSPKDOutput(logits=out.logits, cache=out.cache, **speech)

    def run_llm(self, lora_mask=None, hidden_only=False, **kwargs):
        """The transformers LLM with PLoRA switched on where `lora_mask [B, L]` is True.

        `hidden_only=True` runs the decoder without the output head and returns its output
        (`last_hidden_state [B, L, H]`, after the final norm): training losses apply the head
        themselves, only at the rows they use.
        """
        if lora_mask is not None and self.llm_lora is not None:
            self._plora.mask = lora_mask.bool()
        try:
            return (self.llm.base_model if hidden_only else self.llm)(**kwargs)
        finally:
            self._plora.mask = None

    # -- generation ----------------------------------------------------------------------------

    def feature_extractor(self):
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor(
            feature_size=self.config.encoder_config.num_mel_bins,
            sampling_rate=self.config.sampling_rate,
        )

    def audio_features(self, audio_16k):
        """16 kHz mono audio -> (log-mel [1, n_mels, F], feature mask [1, F]), as training saw it.

        Whisper's feature extractor over the audio's own length (F = len // 160 frames). In 30 s
        mode the frames are then padded to the encoder's full window with the utterance's
        silence level (its maximum - 2: what the extractor gives zero padding), as the training
        batches were; the mask marks the audio's own frames.
        """
        audio = np.asarray(audio_16k, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio_16k must be 1-D mono samples at 16 kHz, got {audio.shape}")
        window = 2 * self.config.encoder_config.max_source_positions
        if audio.size // HOP > window:
            raise ValueError(
                f"audio has {audio.size} samples ({audio.size / 16000:.2f} s); the encoder takes "
                f"at most {window} mel frames ({window * HOP / 16000:.2f} s)"
            )
        feats = self.feature_extractor()(
            audio, sampling_rate=self.config.sampling_rate, padding="longest", return_tensors="pt"
        )["input_features"]
        frames = feats.shape[-1]
        if self.config.pad_to_30s:
            silence = feats.max() - 2.0
            feats = nn.functional.pad(feats, (0, window - frames), value=float(silence))
        mask = torch.arange(feats.shape[-1])[None, :] < frames
        return feats.to(self.device), mask.to(self.device)

    def tokenizer(self):
        if self._tokenizer is None:
            # This directory's code is already trusted (it is running); its config.json maps
            # only the model classes, so the tokenizer comes from tokenizer_config.json.
            self._tokenizer = AutoTokenizer.from_pretrained(
                self.config.name_or_path, trust_remote_code=True
            )
        return self._tokenizer

    def prompt_pieces(self, tokenizer, instruction: str):
        """(prefix ids, middle ids, stop ids): the chat template around the speech, as trained.

        The template is rendered with placeholders for the speech and the response and split
        there; the stop ids are the end-of-turn token, the tokenizer's eos and the LLM's eos.
        """
        template = self.config.chat_template or tokenizer.chat_template
        if not template:
            raise ValueError("no chat template: set chat_template in config.json or the tokenizer")
        messages = []
        if self.config.system_prompt is not None:
            messages.append({"role": "system", "content": self.config.system_prompt})
        messages += [
            {"role": "user", "content": f"{instruction}{TRANSCRIPT_MARK}"},
            {"role": "assistant", "content": RESPONSE_MARK},
        ]
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        prefix, rest = text.split(TRANSCRIPT_MARK)
        middle, suffix = rest.split(RESPONSE_MARK)

        def ids(s):
            return tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

        eos = tokenizer.eos_token_id
        suffix_ids = ids(suffix)
        special = set(tokenizer.all_special_ids) - {tokenizer.pad_token_id, tokenizer.bos_token_id}
        if eos is not None and eos in suffix_ids:
            end_of_turn = eos
        else:
            end_of_turn = next((t for t in suffix_ids if t in special), eos)
        stops = {end_of_turn} | ({eos} if eos is not None else set())
        llm_eos = self.config.llm_config.eos_token_id
        stops |= set(llm_eos if isinstance(llm_eos, (list, tuple)) else [llm_eos])
        return ids(prefix), ids(middle), sorted(t for t in stops if t is not None)

    @torch.no_grad()
    def generate_from_audio(
        self, audio_16k, instruction: str | None = "", max_new_tokens: int = 64, tokenizer=None
    ) -> str:
        """Greedy response to 16 kHz mono audio (a 1-D float array), as `blspkd_jax.generate
        speech` gives it: the new tokens up to the end of turn, decoded without special tokens
        and stripped. `instruction=None` uses the run's default instruction."""
        tokenizer = tokenizer or self.tokenizer()
        ids = self.greedy_ids_from_audio(audio_16k, instruction, max_new_tokens, tokenizer)
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def greedy_ids_from_audio(
        self, audio_16k, instruction: str | None = "", max_new_tokens: int = 64, tokenizer=None
    ) -> list[int]:
        """The greedy new token ids (without the stop token) for 16 kHz mono audio.

        Prompt: the training chat layout with the CIF speech tokens where the transcript was.
        PLoRA is on at those positions during the prefill and off for every generated token; the
        KV cache carries the prompt. Stops at the end-of-turn/eos ids or after max_new_tokens.
        """
        tokenizer = tokenizer or self.tokenizer()
        if instruction is None:
            instruction = self.config.default_instruction
        feats, mask = self.audio_features(audio_16k)
        tokens, token_mask, _ = self.encode_speech(feats, mask)
        speech = tokens[0, : int(token_mask[0].sum())]
        prefix, middle, stops = self.prompt_pieces(tokenizer, instruction)
        embed = self.llm.get_input_embeddings()
        as_ids = lambda ids: torch.tensor(ids, dtype=torch.long, device=self.device)  # noqa: E731
        embeds = torch.cat(
            [embed(as_ids(prefix)), speech.to(embed.weight.dtype), embed(as_ids(middle))]
        )
        lora_mask = torch.zeros(embeds.shape[0], dtype=torch.bool, device=self.device)
        lora_mask[len(prefix) : len(prefix) + speech.shape[0]] = True
        out = self.run_llm(inputs_embeds=embeds[None], lora_mask=lora_mask[None], use_cache=True)
        new = []
        while len(new) < max_new_tokens:
            token = int(out.logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
            if len(new) < max_new_tokens:
                out = self.llm(input_ids=as_ids([[token]]), cache=out.cache, use_cache=True)
        return new


__all__ = ["BLSPKDModel", "BLSPKDPreTrainedModel", "cif_inference"]
