"""The method's networks, bottom-up: `layers` (shared blocks), `encoder` (Whisper), `cif`, `adapter`
(the CFormer), `llm_config` and `llm` (the decoder with PLoRA and a KV cache), `blspkd` (the three
composed), `sharding` (how their logical axes map onto a mesh), `hf` and `blspkd_hf` (Hugging Face
checkpoints in and out). Nothing here imports training, inference, data or the demo."""
