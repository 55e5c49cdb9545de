"""The PyTorch side of `train_step.py`: the same BLSP-KD model exported with
`python -m blspkd_jax.export` and its train step (the losses of `training.objective` written out
in PyTorch, clipping and AdamW with the project's decay mask and schedule)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blspkd_jax.inference import export
from blspkd_jax.models import blspkd_hf, hf
from blspkd_jax.models.blspkd import BLSPKDConfig
from blspkd_jax.training import optim
from blspkd_jax.training.objective import LossConfig


def export_torch(model_cfg: BLSPKDConfig, flat_params, out) -> torch.nn.Module:
    """Write `flat_params` as an exported HF directory `out` (config.json, safetensors, the
    modeling files) and load it back with `AutoModel.from_pretrained(trust_remote_code=True)`."""
    from transformers import AutoModel

    out = Path(out)
    hf.write_config(out, blspkd_hf.hf_config(model_cfg))
    hf.write_state_dict(out, blspkd_hf.params_to_hf(model_cfg, optim.unflatten(dict(flat_params))))
    for name in export.MODELING_FILES:
        shutil.copyfile(export.MODELING_DIR / name, out / name)
    return AutoModel.from_pretrained(str(out), trust_remote_code=True, local_files_only=True)


def torch_param_paths(model_cfg: BLSPKDConfig, shapes: dict[str, tuple]) -> dict[str, str]:
    """PyTorch state-dict name -> our flat parameter path.

    Each of our tensors is filled with its own index and exported: every exported tensor then
    holds one value, the index of the tensor it came from (layout changes move values, never mix
    them)."""
    keys = sorted(shapes)
    marked = {k: np.full(shapes[k], i, np.float32) for i, k in enumerate(keys)}
    out = {}
    for name, a in blspkd_hf.params_to_hf(model_cfg, optim.unflatten(marked)).items():
        values = np.unique(a)
        if values.size != 1:
            raise AssertionError(f"exported tensor {name} mixes parameters {values[:4]}")
        out[name] = keys[int(values[0])]
    return out


def from_torch(model_cfg: BLSPKDConfig, model, grads: bool = False) -> dict[str, np.ndarray]:
    """Our flat parameters (or, with `grads`, gradients: zero where a tensor has none) read back
    from the PyTorch model, through `blspkd_hf.params_from_hf`."""
    named = dict(model.named_parameters())
    sd = {}
    for name, t in model.state_dict().items():
        if grads:
            g = named[name].grad if name in named else None
            t = torch.zeros_like(t) if g is None else g
        sd[name] = t.detach().float().numpy()
    return {
        k: np.asarray(v) for k, v in optim.flatten(blspkd_hf.params_from_hf(model_cfg, sd)).items()
    }


def torch_batch(batch, device="cpu") -> dict[str, torch.Tensor]:
    """numpy batch -> torch tensors (ids as int64, masks as bool)."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.array(v))
        out[k] = (t.long() if k in ("input_ids", "text_lengths") else t).to(device)
    return out


def torch_hidden(model, b: dict):
    """(teacher hidden [B, L, H], student hidden [B, L, H], alphas [B, T]): the two passes of the
    step, the teacher under no_grad."""
    ids, am, sm = b["input_ids"], b["attention_mask"], b["speech_mask"]
    positions = (am.long().cumsum(-1) - 1).clamp_min(0)
    llm_kw = dict(attention_mask=am, position_ids=positions, use_cache=False)
    with torch.no_grad():
        teacher = model.run_llm(hidden_only=True, input_ids=ids, **llm_kw).last_hidden_state
    tokens, _, alphas = model.encode_speech(b["features"], b["feature_mask"], b["text_lengths"])
    text = model.llm.get_input_embeddings()(ids)
    rank = (sm.long().cumsum(-1) - 1).clamp(0, tokens.shape[1] - 1)
    speech = torch.take_along_dim(tokens, rank[..., None], dim=1).to(text.dtype)
    embeds = torch.where(sm[..., None], speech, text)
    student = model.run_llm(
        hidden_only=True, inputs_embeds=embeds, lora_mask=sm, **llm_kw
    ).last_hidden_state
    return teacher, student, alphas


def torch_losses(model, b: dict, loss_cfg: LossConfig):
    """(total, {term: value}): `training.objective.compute_losses` written out in PyTorch.

    Rows (as `objective.loss_rows`): input_kl at the transcript positions, response_kl and
    response_ce at every position whose next token is a response or end-of-turn token, both only
    for real examples. KL(teacher || student) of softmax(logits / T), summed over the vocabulary,
    averaged over rows; the teacher under no_grad. Logits are made once, at the rows some loss
    uses. cif: |sum(alpha) - n| / n averaged over the real examples.
    """
    ids, am, sm = b["input_ids"], b["attention_mask"], b["speech_mask"]
    teacher, student, alphas = torch_hidden(model, b)
    example = b["example_mask"][:, None]
    rows_input = (sm & example).flatten()
    rows_response = (F.pad(b["response_mask"][:, 1:], (0, 1)) & example & am).flatten()
    used = (rows_input | rows_response).nonzero().squeeze(-1)
    head = model.llm.get_output_embeddings().weight  # [V, H]
    H = student.shape[-1]
    s_logits = student.reshape(-1, H)[used].float() @ head.float().T

    def mean(values, rows):
        w = rows[used].to(values.dtype)
        return (values * w).sum() / w.sum().clamp_min(1.0)

    terms = {}
    if loss_cfg.input_kl or loss_cfg.response_kl:
        temp = loss_cfg.temperature
        with torch.no_grad():
            t_logits = teacher.reshape(-1, H)[used].float() @ head.float().T
            log_p = F.log_softmax(t_logits / temp, dim=-1)
        log_q = F.log_softmax(s_logits / temp, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        if loss_cfg.input_kl:
            terms["input_kl"] = mean(kl, rows_input)
        if loss_cfg.response_kl:
            terms["response_kl"] = mean(kl, rows_response)
    if loss_cfg.response_ce:
        labels = F.pad(ids[:, 1:], (0, 1)).flatten()[used]
        ce = F.cross_entropy(s_logits, labels, reduction="none")
        terms["response_ce"] = mean(ce, rows_response)
    if loss_cfg.cif:
        n = b["text_lengths"].float()
        err = (alphas.sum(-1) - n).abs() / n.clamp_min(1.0)
        ex = b["example_mask"].float()
        terms["cif"] = (err * ex).sum() / ex.sum().clamp_min(1.0)
    total = sum(loss_cfg.weight(k) * v for k, v in terms.items())
    return total, terms


class TorchTrainStep:
    """One BLSP-KD train step of the exported PyTorch model, as `train_state.make_train_step`:
    losses, backward, global-norm clipping, AdamW with the decay mask of `optim.decays` and the
    learning rate of `optim.learning_rate_schedule` at each step; a non-finite loss or gradient
    norm skips the update. Only the tensors whose paths `trainable` selects get gradients.

    `compile=True` runs the losses (both forward passes) under `torch.compile`; the backward is
    then AOTAutograd's compiled graph. Calling returns the step's metrics (detached tensors).
    """

    def __init__(
        self,
        model,
        paths: dict[str, str],
        trainable: set[str],
        loss_cfg: LossConfig,
        *,
        learning_rate,
        warmup_steps,
        total_steps,
        decay="cosine",
        end_factor=0.0,
        weight_decay=0.05,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip_norm=1.0,
        compile=False,
    ):
        self.model = model.train()
        self.loss_cfg = loss_cfg
        schedule = optim.learning_rate_schedule(
            learning_rate, warmup_steps, total_steps, decay, end_factor
        )
        self.learning_rates = [float(x) for x in schedule(np.arange(total_steps + 1))]
        self.clip = grad_clip_norm or math.inf
        decay_group, plain_group = [], []
        for name, p in model.named_parameters():
            if name not in paths:
                raise AssertionError(f"PyTorch parameter {name} has no counterpart in our params")
            path = paths[name]
            p.requires_grad_(path in trainable)
            if p.requires_grad:
                (decay_group if optim.decays(path, p) else plain_group).append(p)
        self.params = decay_group + plain_group
        if {paths[n] for n, p in model.named_parameters() if p.requires_grad} != set(trainable):
            raise AssertionError("the trainable sets of the two models differ")
        self.opt = torch.optim.AdamW(
            [
                {"params": decay_group, "weight_decay": weight_decay},
                {"params": plain_group, "weight_decay": 0.0},
            ],
            lr=self.learning_rates[0],
            betas=(b1, b2),
            eps=eps,
        )
        self.loss_fn = torch.compile(torch_losses) if compile else torch_losses
        self.step = 0

    def __call__(self, b):
        self.opt.zero_grad(set_to_none=True)
        total, terms = self.loss_fn(self.model, b, self.loss_cfg)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        finite = bool(torch.isfinite(total) & torch.isfinite(grad_norm))
        if finite:
            lr = self.learning_rates[min(self.step, len(self.learning_rates) - 1)]
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
        self.step += 1
        metrics = {k: v.detach() for k, v in terms.items()}
        return {"loss": total.detach(), **metrics, "grad_norm": grad_norm, "skipped": not finite}
