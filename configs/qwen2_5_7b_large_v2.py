"""Paper scale: Whisper-large-v2 encoder + Qwen2.5-7B-Instruct (the supported successor of the
paper's Qwen-7B-Chat). Variants: `stage1` (alignment: CFormer only) and `stage2` (PLoRA fine-tuning
on instruction data, starting from stage 1 via train.init_from).

Weights are read from local Hugging Face directories, e.g.
  huggingface-cli download openai/whisper-large-v2 --local-dir hf/whisper-large-v2
  huggingface-cli download Qwen/Qwen2.5-7B-Instruct --local-dir hf/Qwen2.5-7B-Instruct
Sized for a v5p-64 / 4x8 H100 slice: fsdp over all devices, bf16 compute, remat, scanned layers,
the frozen weights in bf16 (fp32 master copies of the trained ones). Check that a slice holds it
before renting one (no download needed: missing hf/ directories are planned from presets):
  python -m blspkd_jax.train --config configs/qwen2_5_7b_large_v2.py:stage1 --workdir W \
      --compile-only v5p:4x4x4
"""

from blspkd_jax.config import base_config


def get_config(arg: str = "stage1"):
    c = base_config()
    c.model.encoder.hf_path = "hf/whisper-large-v2"
    c.model.llm.hf_path = "hf/Qwen2.5-7B-Instruct"
    c.data.train_manifest = "data/train.jsonl"
    c.data.eval_manifest = "data/eval.jsonl"
    c.data.frame_buckets = (3000,)  # pad to 30 s: faithful to the checkpoint
    c.data.token_buckets = (128, 256)
    c.data.min_seconds = 1.0
    c.data.max_seconds = 30.0
    c.data.max_text_tokens = 200
    c.data.worker_count = 8
    c.model.adapter.max_tokens = 200
    for part in (c.model.encoder, c.model.adapter, c.model.llm):
        part.dtype = "bfloat16"
        part.scan_layers = True
        part.remat = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.train.frozen_dtype = "bfloat16"  # halves the frozen 7B LLM and Whisper's memory
    c.log_every_steps = 10
    c.checkpoint_every_steps = 1000
    c.eval_every_steps = 2000
    c.eval_max_batches = 50

    if arg == "stage1":
        c.total_steps = 20000
        c.batch_size = 768
        c.optim.learning_rate = 1e-4
        c.optim.warmup_steps = 1000
        c.optim.weight_decay = 0.05
        c.optim.grad_clip_norm = 1.0
        c.train.trainable = ("^adapter/",)
    elif arg == "stage2":
        c.total_steps = 3000  # about 3 epochs of the instruction data at batch 128
        c.batch_size = 128
        c.optim.learning_rate = 2e-5
        c.optim.warmup_steps = 200
        c.model.llm.lora_rank = 16
        c.model.llm.lora_alpha = 16.0
        c.model.llm.lora_dropout = 0.05
        c.train.trainable = ("^adapter/", "lora_")
        c.train.init_from = "runs/qwen2_5_7b_large_v2_stage1"
    else:
        raise ValueError(f"variant must be stage1 or stage2, got {arg!r}")
    return c
