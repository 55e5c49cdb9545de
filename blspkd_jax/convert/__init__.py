"""Converters from other checkpoint formats to Hugging Face directories (`python -m
blspkd_jax.convert`): CTranslate2 Whisper and GGUF Llama-family LLMs."""
