"""Needle in a haystack: can the model find one fact (text) or one clip (video) at any depth of a long context?

A grid of lengths x depths; each cell builds a haystack of `length` tokens (text) or frames (video), splices the
needle in at `depth` (0 = start, 1 = end), asks the question and scores the answer:

    grid = text_needle_grid(model, lengths=[512, 1024], depths=[0, 0.5, 1])
    grid = video_needle_grid(model, haystack_codes, needle_codes, [16, 32], [0, 0.5, 1],
                             "What colour is the flash?", "Red", options=["Red", "Blue"])
    plot_heatmap(grid, "needle.png")

Text: filler sentences with "The magic number is N." inserted at a sentence boundary, asked "What is the magic
number?" in the chat template; correct when the generated answer contains N. Video: VQGAN codes of haystack
frames (evenly resampled or repeated to the length) with the needle frames spliced in, asked through the
video-first context; correct when the answer contains the expected text (case-insensitive), and with `options`
also scored by option log-likelihood. `accuracy[i][j]` is the cell of `lengths[i]` and `depths[j]`.

Both grids take `result`, a dict they keep equal to the grid so far (a caller keeps the finished cells when a
later one fails), and `report`, a `JobReport` saved after each cell.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lvm.evals.scores import accuracy, accuracy_table, most_likely
from lvm.job_report import JobReport
from lvm.tokenizers import format as fmt

# LWM's needle filler (after Paul Graham's essays, a repetitive text that holds no numbers).
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TEXT_QUESTION = "What is the magic number?"


def sentences(text: str) -> list[str]:
    """Sentences of a filler text (split after . ! ?)."""
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    if not out:
        raise ValueError("the filler text holds no sentences")
    return out


def text_haystack(codec, filler: list[str], n_tokens: int, depth: float, needle: str) -> str:
    """About `n_tokens` tokens of filler sentences (cycled) with `needle` at the sentence boundary nearest
    `depth`."""
    lengths = [len(codec.encode(f" {s}", continuation=True)) for s in filler]
    budget = n_tokens - len(codec.encode(f" {needle}", continuation=True))
    chosen: list[str] = []
    total = 0
    while total + lengths[len(chosen) % len(filler)] <= budget:
        total += lengths[len(chosen) % len(filler)]
        chosen.append(filler[len(chosen) % len(filler)])
    ends = np.cumsum([0] + [lengths[i % len(filler)] for i in range(len(chosen))])  # tokens before boundary k
    at = int(np.argmin(np.abs(ends - depth * total)))
    return " ".join([*chosen[:at], needle, *chosen[at:]])


def text_needle_grid(
    model,
    lengths: list[int],
    depths: list[float],
    *,
    filler: str = FILLER,
    trials: int = 1,
    seed: int = 0,
    max_new_tokens: int = 12,
    progress: bool = False,
    result: dict | None = None,
    report: JobReport | None = None,
) -> dict:
    """Accuracy of finding "The magic number is N." in `lengths` tokens of filler at each depth (`trials`
    random numbers per cell)."""
    overhead = len(fmt.build(fmt.question_only_prompt(TEXT_QUESTION), model.codec))  # all but the haystack
    longest = model.context - overhead - max_new_tokens
    if max(lengths) > longest:
        raise ValueError(
            f"a haystack of {max(lengths)} tokens does not fit the model's context of {model.context} "
            f"(at most {longest} with the question and {max_new_tokens} answer tokens); give smaller --lengths"
        )
    rng = np.random.default_rng(seed)
    filler_sentences = sentences(filler)
    cells = _Cells("text", "tokens", lengths, depths, result, report, question=TEXT_QUESTION)
    bar = _bar(len(lengths) * len(depths) * trials, progress)
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                number = str(rng.integers(10_000, 100_000))
                haystack = text_haystack(
                    model.codec, filler_sentences, length, depth, f"The magic number is {number}."
                )
                prompt = fmt.text_chat(haystack, TEXT_QUESTION)
                answer = model.generate_text(prompt, max_new_tokens=max_new_tokens).strip()
                cells.add(
                    {"length": length, "depth": depth, "expected": number, "answer": answer,
                     "correct": number in answer}
                )  # fmt: skip
                bar.update()
    bar.close()
    return cells.grid


def haystack_frames(codes: np.ndarray, n: int) -> np.ndarray:
    """`n` frames of codes [T, h, w]: evenly resampled when there are enough, else repeated in order."""
    if len(codes) >= n:
        return codes[np.round(np.linspace(0, len(codes) - 1, n)).astype(int)]
    return codes[np.arange(n) % len(codes)]


def splice(haystack: np.ndarray, needle: np.ndarray, length: int, depth: float) -> np.ndarray:
    """`length` frames: the haystack resampled to `length - len(needle)` frames, the needle inserted at `depth`."""
    k = len(needle)
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    if length <= k:
        raise ValueError(f"a haystack of {length} frames has no room around a needle of {k} frames")
    base = haystack_frames(haystack, length - k)
    at = int(round(depth * (length - k)))
    return np.concatenate([base[:at], needle, base[at:]])


def video_needle_grid(
    model,
    haystack_codes: np.ndarray,
    needle_codes: np.ndarray,
    lengths: list[int],
    depths: list[float],
    question: str,
    answer: str,
    options: list[str] | None = None,
    *,
    max_new_tokens: int = 12,
    progress: bool = False,
    result: dict | None = None,
    report: JobReport | None = None,
) -> dict:
    """Accuracy of answering `question` (expected `answer`) about the needle frames spliced into `lengths`
    frames of haystack at each depth; with `options`, also by option log-likelihood (answer must be one)."""
    if options is not None and answer not in options:
        raise ValueError(f"the expected answer {answer!r} is not one of the options {options}")
    option_tokens = [len(model.codec.encode(fmt.answer_text(o), continuation=True)) for o in options or []]
    answer_tokens = max([max_new_tokens, *option_tokens])
    room = len(model.codec.encode(question)) + answer_tokens + 16
    fit = model.frames_that_fit(room)
    if max(lengths) > fit:
        raise ValueError(
            f"{max(lengths)} frames do not fit the model's context of {model.context} tokens (at most {fit} "
            f"frames with the question and answer); give smaller --lengths"
        )
    cells = _Cells("video", "frames", lengths, depths, result, report, question=question, options=options)
    bar = _bar(len(lengths) * len(depths), progress)
    for length in lengths:
        for depth in depths:
            ctx = model.video_context(splice(haystack_codes, needle_codes, length, depth), room)
            generated = model.answer(ctx, question, max_new_tokens=max_new_tokens)
            cell = {"length": length, "depth": depth, "expected": answer, "answer": generated,
                    "correct": answer.lower() in generated.lower()}  # fmt: skip
            if options is not None:
                scores = model.option_logprobs(ctx, question, options)
                choice = most_likely(options, scores)
                cell.update(option_scores=scores, option_choice=choice, option_correct=choice == answer)
            cells.add(cell)
            bar.update()
    bar.close()
    return cells.grid


class _Cells:
    """The finished cells of a grid and the grid they make: accuracy tables [len(lengths), len(depths)] (mean
    over each cell's trials) and the cells themselves, kept in `result` and saved to `report` after each cell."""

    def __init__(self, mode: str, unit: str, lengths, depths, result: dict | None, report, **extra):
        self.lengths, self.depths, self.report = list(lengths), list(depths), report
        self.cells: list[dict] = []
        self.grid = {} if result is None else result
        self.grid.update(mode=mode, unit=unit, lengths=self.lengths, depths=self.depths, **extra)
        self._update()

    def add(self, cell: dict) -> None:
        self.cells.append(cell)
        self._update()
        if self.report is not None:
            self.report.save()

    def _update(self) -> None:
        cells, lengths, depths = self.cells, self.lengths, self.depths
        self.grid["accuracy"] = accuracy_table(cells, lengths, depths)
        self.grid["mean_accuracy"] = accuracy(cells)
        if cells and "option_correct" in cells[0]:
            self.grid["option_accuracy"] = accuracy_table(cells, lengths, depths, "option_correct")
        self.grid["cells"] = cells


def procedural_frames(n: int, resolution: int, rgb: tuple[int, int, int] | None = None, seed: int = 0):
    """uint8 frames [n, res, res, 3]: grey noise (rgb None) or a noisy solid colour, for haystacks and needles."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-20, 20, (n, resolution, resolution, 3))
    base = rng.integers(60, 196, (n, 1, 1, 1)) if rgb is None else np.array(rgb)[None, None, None]
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def plot_heatmap(
    grid: dict,
    path: str | Path,
    title: str | None = None,
    key: str = "accuracy",
    depth_labels: list[str] | None = None,
) -> Path:
    """A depth x length heatmap of `grid[key]` (green = found, red = missed) written as PNG; the depths are
    labelled as percentages unless `depth_labels` names them (e.g. depth bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.asarray(grid[key]).T  # [depths, lengths]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.9 * acc.shape[1]), max(2.5, 1.0 + 0.5 * acc.shape[0])))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
    ax.set_yticks(range(len(grid["depths"])), depth_labels or [f"{d:.0%}" for d in grid["depths"]])
    ax.set_xlabel(f"context length ({grid['unit']})")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"needle ({grid['mode']}): {key}", fontsize=10)
    for (i, j), v in np.ndenumerate(acc):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="needle", unit="cell", disable=not enabled)
