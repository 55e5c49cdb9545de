"""Whisper-large-v3 (128 mels) + Llama-3.1-8B-Instruct (llama3 rope scaling), the Ultravox-style
pairing at paper scale. Variants `stage1` and `stage2` as in qwen2_5_7b_large_v2.py.

  huggingface-cli download openai/whisper-large-v3 --local-dir hf/whisper-large-v3
  huggingface-cli download meta-llama/Llama-3.1-8B-Instruct --local-dir hf/Llama-3.1-8B-Instruct
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_qwen7b", Path(__file__).with_name("qwen2_5_7b_large_v2.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg: str = "stage1"):
    c = _base.get_config(arg)
    c.model.encoder.hf_path = "hf/whisper-large-v3"
    c.model.llm.hf_path = "hf/Llama-3.1-8B-Instruct"
    c.mesh.tensor = 1
    if arg == "stage2":
        c.train.init_from = "runs/llama3_1_8b_large_v3_stage1"
    return c
