"""`make demo`, the embedded default: what only it needs. An espeak-ng `corpus` of WordNet
`sentences`, a small `teacher` LM and a CTC-pretrained `asr_encoder` standing in for pretrained
backbones, and the `stages` that run the method end to end. Nothing outside the demo imports it."""
