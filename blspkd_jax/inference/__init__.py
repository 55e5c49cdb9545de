"""Using a trained run, on top of `training`: `workdir` (load a run), `generate` (KV-cache
decoding), `respond` (responses to speech and to transcripts), `labels` (continuation writing),
`metrics`, `evaluate`, and `export` to Hugging Face (with the PyTorch modeling files in
`hf_modeling/`)."""
