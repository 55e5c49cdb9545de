"""One GPU: Whisper-small encoder + Qwen2.5-0.5B-Instruct (the shapes of the MFU benchmark).

  huggingface-cli download openai/whisper-small --local-dir hf/whisper-small
  huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir hf/Qwen2.5-0.5B-Instruct
Variable-length encoder input (shorter buckets than 30 s) trades exact checkpoint behaviour for
speed on short utterances; set model.encoder.pad_to_30s=true and data.frame_buckets=(3000,) for
the faithful mode.
"""

from blspkd_jax.config import base_config


def get_config(arg: str = "stage1"):
    c = base_config()
    c.model.encoder.hf_path = "hf/whisper-small"
    c.model.llm.hf_path = "hf/Qwen2.5-0.5B-Instruct"
    c.data.train_manifest = "data/train.jsonl"
    c.data.eval_manifest = "data/eval.jsonl"
    c.model.encoder.pad_to_30s = "false"
    c.data.frame_buckets = (1000, 2000, 3000)
    c.data.token_buckets = (128, 256)
    c.data.max_text_tokens = 200
    c.data.worker_count = 6
    c.model.adapter.max_tokens = 200
    for part in (c.model.encoder, c.model.adapter, c.model.llm):
        part.dtype = "bfloat16"
    c.model.llm.remat = "dots"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.batch_size = 32
    c.grad_accum_steps = 1
    c.total_steps = 20000
    c.checkpoint_every_steps = 1000
    c.eval_every_steps = 2000
    c.eval_max_batches = 50
    if arg == "stage2":
        c.total_steps = 3000
        c.optim.learning_rate = 2e-5
        c.optim.warmup_steps = 200
        c.model.llm.lora_rank = 16
        c.train.trainable = ("^adapter/", "lora_")
        c.train.init_from = "runs/qwen2_5_0_5b_small_stage1"
    elif arg != "stage1":
        raise ValueError(f"variant must be stage1 or stage2, got {arg!r}")
    return c
