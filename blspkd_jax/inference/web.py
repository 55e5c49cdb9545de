"""The web demo (`python -m blspkd_jax.serve`): record or upload speech in a browser, pick or type
an instruction, and watch the trained model's answer stream in, next to how CIF cut the speech
into tokens and how long the answer took. A Gradio app, as speech-LLM users know from the peers'
demos.

A chunk-causal run (`model.encoder.chunk_frames > 0`) answers through the streaming path
(`inference.stream`): the audio is pushed in pieces as a microphone would deliver it and the
answer starts from the end of speech; any other run answers offline (`respond`), the same
model as `generate speech`. Audio that cannot be used (empty, undecodable, too short, longer than
the encoder's window) gets a message in the answer box, never a crash.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from blspkd_jax.data import audio as audio_lib
from blspkd_jax.data.features import log_mel, pad_features
from blspkd_jax.inference import plots, respond
from blspkd_jax.inference.generate import decode_response
from blspkd_jax.inference.stream import Streamer, StreamError

log = logging.getLogger(__name__)

PIECE_S = 0.1  # seconds of audio per push: what a microphone delivers at a time
# Offered besides the run's own instruction (`--instruction` replaces them): the demo trains
# with these (`python -m blspkd_jax.demo`).
INSTRUCTIONS = (
    "Repeat the following text: ",
    "Continue the following text in a coherent and engaging style with less than 40 words.\n\n",
)


class Answerer:
    """One trained run answering one utterance at a time (streaming when the run can)."""

    def __init__(self, run, *, max_new_tokens: int = 128, out_dir: str | None = None):
        self.run = run
        self.max_new_tokens = max_new_tokens
        self.window_s = 2 * run.model.config.encoder.max_source_positions / 100
        self.out = Path(out_dir or tempfile.mkdtemp(prefix="blspkd-serve-"))
        try:
            self.streamer = Streamer(run, max_new_tokens=max_new_tokens)
        except StreamError as e:
            log.info("answering offline: %s", e)
            self.streamer = None
        self._count = 0

    @property
    def mode(self) -> str:
        return "streaming" if self.streamer is not None else "offline"

    def warmup(self, instructions=(None,)) -> None:
        """Compile everything on a second of silence for each instruction, so that no user
        waits for a compilation."""
        for instruction in instructions:
            for _ in self.answer_wave(np.zeros(16000, np.float32), instruction):
                pass

    def answer(self, path: str | None, instruction: str | None):
        """Yield `(response so far, alignment PNG path or None, timing markdown)`."""
        if not path:
            yield "No audio: record or upload some speech first.", None, ""
            return
        try:
            wave = audio_lib.load(path)
        except audio_lib.AudioError as e:
            yield f"Could not read the audio: {e}", None, ""
            return
        yield from self.answer_wave(wave, instruction)

    def answer_wave(self, wave: np.ndarray, instruction: str | None):
        instruction = instruction or None  # as typed: a trailing space is part of the prompt
        seconds = wave.size / 16000
        if wave.size <= audio_lib.MIN_SAMPLES:
            yield f"The audio is too short ({seconds * 1000:.0f} ms): say something.", None, ""
            return
        if seconds > self.window_s:
            yield (
                f"The audio is {seconds:.1f} s, longer than the {self.window_s:g} s the encoder "
                "hears: record a shorter one.",
                None,
                "",
            )
            return
        if self.streamer is None:
            yield from self._offline(wave, instruction, seconds)
        else:
            yield from self._stream(wave, instruction, seconds)

    def _stream(self, wave, instruction, seconds):
        session = self.streamer.session(instruction)
        step = int(16000 * PIECE_S)
        for i in range(0, wave.size, step):
            session.push(wave[i : i + step])
        session.finish()
        t0 = time.perf_counter()
        text, n = "", 0
        for text in session.response_text():
            n += 1
            yield text, None, ""
        total = time.perf_counter() - t0 + session.timing.end_to_first_token_s
        fires = session.fire_frames
        figure = self._figure(session.mel, session.alphas, fires, seconds, rescale=False)
        timing = (
            f"**streaming** · {seconds:.2f} s of speech · {session.tokens} speech tokens fired · "
            f"first response token **{1e3 * session.timing.end_to_first_token_s:.0f} ms** after "
            f"the end of speech · {n} tokens in {total:.2f} s · while listening: "
            f"{session.timing.compute_s / max(session.timing.audio_s, 1e-9):.2f} s of compute "
            "per second of audio"
        )
        yield text, figure, timing

    def _offline(self, wave, instruction, seconds):
        run = self.run
        t0 = time.perf_counter()
        mel = log_mel(wave, run.model.config.encoder.num_mel_bins)
        feats, mask = pad_features([mel], respond.frame_bucket(run, mel.shape[1]))
        vectors, counts, alphas = respond.speech_vectors(run, feats, mask, return_alphas=True)
        stops = respond.stop_ids_for(run, [instruction])
        prompts = respond.build_prompts(run.layout, [int(counts[0])], [instruction])
        new = respond.generate_from_prompts(
            run, prompts, vectors, max_new_tokens=self.max_new_tokens, stop_ids=stops
        )
        text = decode_response(run.tokenizer, new[0], stops)
        total = time.perf_counter() - t0
        yield text, None, ""
        alphas = alphas[0][: (mel.shape[1] + 1) // 2]
        figure = self._figure(mel, alphas, plots.fire_points(alphas), seconds, rescale=True)
        timing = (
            f"**offline** (this run is not chunk-causal) · {seconds:.2f} s of speech · "
            f"{int(counts[0])} speech tokens · the whole answer {total:.2f} s after the end of "
            "speech"
        )
        yield text, figure, timing

    def _figure(self, mel, alphas, fires, seconds, rescale):
        self._count += 1
        labels = [str(k + 1) for k in range(len(fires))]
        total = float(np.sum(alphas))
        title = f"CIF fired {len(fires)} tokens over {seconds:.2f} s (sum of alpha {total:.2f})"
        fig = plots.cif_figure(mel, alphas, fires, labels, "log-mel", title, rescale=rescale)
        return plots.save_png(fig, self.out / f"cif-{self._count}.png")


def offered_instructions(run, instructions=INSTRUCTIONS) -> list[str]:
    """The run's own instruction (when it has one) and `instructions`, each once."""
    return list(dict.fromkeys(c for c in (run.layout.default_instruction, *instructions) if c))


def build_app(answerer: Answerer, instructions=INSTRUCTIONS):
    """The Gradio Blocks app around `answerer`; the instruction box offers the run's own
    instruction and `instructions`, and takes any typed one."""
    import gradio as gr  # the web demo's own dependency: imported only here

    run = answerer.run
    choices = offered_instructions(run, instructions)
    with gr.Blocks(title="blspkd-jax: talk to it") as app:
        gr.Markdown(
            f"## Talk to it\nRun `{run.workdir}` at step {run.step}, answering **{answerer.mode}**."
            " Record or upload speech, pick or type an instruction, press *Answer*."
        )
        with gr.Row():
            with gr.Column():
                audio = gr.Audio(
                    sources=["upload", "microphone"], type="filepath", label="Speech",
                    elem_id="speech",
                )  # fmt: skip
                instruction = gr.Dropdown(
                    choices=choices, value=choices[0] if choices else None,
                    allow_custom_value=True, label="Instruction", elem_id="instruction",
                )  # fmt: skip
                button = gr.Button("Answer", variant="primary", elem_id="answer")
            with gr.Column():
                response = gr.Textbox(label="Response", lines=4, elem_id="response")
                timing = gr.Markdown(elem_id="timing")
        picture = gr.Image(label="How CIF cut the speech into tokens", elem_id="alignment")
        button.click(
            answerer.answer, inputs=[audio, instruction], outputs=[response, picture, timing]
        )
    return app
