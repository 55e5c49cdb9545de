"""Pictures of a run as PNG files (`python -m blspkd_jax.plot`): its loss curves from
`metrics.jsonl`, and how its CIF cuts one utterance into tokens: the log-mel, the firing weights
alpha over time and the frames where each token fires, labelled with the transcript's tokens."""

from __future__ import annotations

import json
import math
import os
import posixpath

import matplotlib

matplotlib.use("Agg")  # files only: no display is ever needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from blspkd_jax.data import audio as audio_lib  # noqa: E402
from blspkd_jax.data import storage  # noqa: E402
from blspkd_jax.data.layout import text_ids  # noqa: E402
from blspkd_jax.data.manifest import DataError  # noqa: E402
from blspkd_jax.inference.respond import load_features, speech_alphas  # noqa: E402

# The curves worth a panel each, in this order, when the run logged them.
CURVES = (
    ("loss", "total loss"),
    ("input_kl", "input KL (transcript positions)"),
    ("response_kl", "response KL"),
    ("cif", "CIF quantity loss"),
    ("response_ce", "response cross-entropy"),
    ("learning_rate", "learning rate"),
)
EVAL_CURVES = ("eval/input_kl", "eval/response_kl", "eval/top1_input", "eval/cif_length_error")


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The rows of `workdir/metrics.jsonl` (a line cut by a kill mid-write is left out)."""
    path = storage.join(os.fspath(workdir), "metrics.jsonl")
    if not storage.isfile(path):
        raise DataError(f"{path}: not found (python -m blspkd_jax.train writes it)")
    rows = []
    with storage.open(path) as f:
        text = f.read()
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(workdir: str | os.PathLike, out: str | os.PathLike) -> str:
    """One panel per logged quantity against the step: training (lines) and evaluation (dots)."""
    rows = read_metrics(workdir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k in r for k in EVAL_CURVES)]
    panels = [(k, t) for k, t in CURVES if any(k in r for r in train)]
    panels += [(k, k) for k in EVAL_CURVES if any(k in r for r in evals)]
    if not panels:
        raise DataError(
            f"{storage.join(os.fspath(workdir), 'metrics.jsonl')}: no logged losses yet"
        )
    cols = 3
    fig, axes = plt.subplots(
        math.ceil(len(panels) / cols), cols, figsize=(12, 3 * math.ceil(len(panels) / cols))
    )
    axes = np.atleast_1d(axes).ravel()
    for ax, (key, title) in zip(axes, panels, strict=False):
        source = evals if key.startswith("eval/") else train
        xy = [(r["step"], r[key]) for r in source if isinstance(r.get(key), int | float)]
        if xy:
            x, y = zip(*xy, strict=True)
            ax.plot(x, y, "o-" if key.startswith("eval/") else "-", lw=1.2, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{_name(workdir)}: training curves", fontsize=11)
    fig.tight_layout()
    return save_png(fig, out)


def fire_points(alphas: np.ndarray) -> np.ndarray:
    """Encoder frames at which CIF fires, in inference mode: the alphas rescaled to sum to
    `n = max(1, round(sum))`, token k fires at the first frame whose cumulative weight reaches
    k + 1 (the last one at the last frame with weight)."""
    a = np.clip(np.asarray(alphas, np.float64), 0, None)
    total = a.sum()
    n = max(1, int(round(total)))
    if total <= 0:
        return np.zeros(0, int)
    c = np.cumsum(a * n / total)
    fires = np.searchsorted(c, np.arange(1, n + 1) - 1e-9)
    last = int(np.nonzero(a)[0][-1])
    return np.minimum(fires, last)


def plot_cif(run, row, out: str | os.PathLike) -> str:
    """The log-mel of one manifest row's audio, its firing weights and the tokens CIF fires,
    each labelled with the transcript token at that place (`?` past the transcript's end)."""
    feats, mask = load_features(run, [row])
    frames = int(mask[0].sum())
    alphas = np.asarray(speech_alphas(run, feats, mask))[0][: (frames + 1) // 2]
    fires = fire_points(alphas)
    tokens = text_ids(run.tokenizer, [row.text])[0]
    labels = [
        run.tokenizer.decode([tokens[k]]).strip() if k < len(tokens) else "?"
        for k in range(len(fires))
    ]
    title = (
        f"CIF fires {len(fires)} tokens (sum of alpha {alphas.sum():.2f}); the transcript has "
        f"{len(tokens)} (run {_name(run.workdir)}, step {run.step})"
    )
    fig = cif_figure(feats[0][:, :frames], alphas, fires, labels, f"{row.id}: {row.text}", title)
    return save_png(fig, out)


def cif_figure(mel, alphas, fires, labels, heading: str, title: str, rescale: bool = True):
    """The figure `plot_cif` draws: log-mel `[n_mels, F]` on top; below, the firing weights of
    the `ceil(F/2)` encoder frames, the cumulative weight (rescaled to `round(sum)` as offline
    inference does, unless `rescale=False`: the stream's threshold rule) and a line at each fire
    frame labelled with `labels`."""
    frames = mel.shape[1]
    seconds = frames / audio_lib.FRAMES_PER_SECOND
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 5.5), sharex=True)
    top.imshow(
        mel, origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[0]), cmap="magma"
    )
    top.set_ylabel("mel bin")
    top.set_title(heading, fontsize=10)
    t = (np.arange(len(alphas)) + 0.5) * 2 / audio_lib.FRAMES_PER_SECOND  # encoder frames: 20 ms
    bottom.bar(t, alphas, width=0.018, color="tab:blue")
    bottom.set_ylabel("alpha (firing weight)")
    bottom.set_xlabel("seconds")
    bottom.set_ylim(0, max(0.05, float(np.max(alphas, initial=0)) * 1.3))
    total = max(float(np.sum(alphas)), 1e-9)
    cumulative = np.cumsum(alphas) * (max(1, round(total)) / total if rescale else 1.0)
    twin = bottom.twinx()
    twin.plot(t, cumulative, color="tab:gray", lw=1)
    twin.set_ylabel("cumulative weight (grey)", fontsize=9)
    twin.set_ylim(0, max(1.0, float(cumulative[-1]) * 1.05) if len(cumulative) else 1.0)
    for k, (f, label) in enumerate(zip(fires, labels, strict=True)):
        x = t[min(int(f), len(t) - 1)]
        for ax in (top, bottom):
            ax.axvline(x, color="white" if ax is top else "tab:red", lw=0.8, alpha=0.8)
        y = 0.92 - 0.12 * (k % 3)  # staggered so that neighbours don't overlap
        bottom.text(x, y, label, transform=bottom.get_xaxis_transform(), fontsize=8,
                    ha="center", va="top", color="tab:red")  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _name(workdir: str | os.PathLike) -> str:
    """The run's folder name, for titles (a gs:// workdir too)."""
    return posixpath.basename(os.fspath(workdir).rstrip("/"))


def save_png(fig, out: str | os.PathLike) -> str:
    """Write the figure as PNG to `out`, a local path or a URL (storage.py)."""
    out = os.fspath(out)
    storage.makedirs(storage.parent(out))
    with storage.open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out
