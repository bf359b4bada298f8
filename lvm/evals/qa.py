"""Multiple-choice long-video QA in the Video-MME layout, scored by option log-likelihood and by generated letter.

One JSONL line per question: `videoID`, `duration` (short / medium / long), `domain`, `task_type`, `question`,
`options` (["A. ...", "B. ...", ...]) and `answer` (a letter). The video is `{video_dir}/{videoID}.mp4` unless
the line has a `video` field (a path, relative to `video_dir` or absolute, or a gs:// URI).

    items = read_questions("videomme.jsonl")
    report = evaluate(load_model("runs/demo/export"), items, video_dir="videos/")

Each video is encoded and prefilled once (one `video_context`) for all of its questions. `score_videos` yields the
records as they are scored; with a `JobReport`, a video that cannot be read (missing, truncated, corrupt) or a
question that cannot be asked is recorded there and its questions are left out of the scores. Two scores per
question:

- log-likelihood: `Model.option_logprobs` of the option texts (letters stripped) after the bare question; the
  most likely option is the choice (no generation, so it works for models that never learned the letter format);
- letter: greedy generation after "{question}\\nOptions: A. ... B. ...\\nAnswer with the option's letter.",
  the first standalone option letter of the answer is the choice (no letter: wrong).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

from lvm.evals.scores import accuracy, most_likely
from lvm.job_report import JobReport, attempt
from lvm.tokenizers import format as fmt

LETTERS = "ABCDEFGHIJ"
REQUIRED = ("videoID", "question", "options", "answer")
GROUPS = ("duration", "task_type", "domain")  # the report's per-group accuracies
METHODS = ("loglik", "letter")
LETTER_PROMPT = "{question}\nOptions: {options}\nAnswer with the option's letter."
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-J])[.):]\s*")


def read_questions(path: str | Path) -> list[dict]:
    """The questions of a Video-MME-layout JSONL file, checked line by line."""
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            missing = [k for k in REQUIRED if not isinstance(item, dict) or k not in item]
            if missing:
                raise ValueError(f"{path}:{n}: missing field(s) {', '.join(missing)} (Video-MME layout)")
            options = item["options"]
            if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
                raise ValueError(f"{path}:{n}: options must be a list of 2 to {len(LETTERS)} strings")
            if str(item["answer"]).strip() not in LETTERS[: len(options)]:
                raise ValueError(f"{path}:{n}: answer {item['answer']!r} is not a letter of the options")
            items.append(item)
    if not items:
        raise ValueError(f"{path} holds no questions")
    return items


def video_uri(item: dict, video_dir: str | Path | None) -> str:
    """Where the question's video is: its `video` field, else `{video_dir}/{videoID}.mp4`."""
    video = item.get("video")
    if video and ("://" in video or Path(video).is_absolute() or video_dir is None):
        return video
    base = Path(video_dir) if video_dir is not None else Path()
    return str(base / (video or f"{item['videoID']}.mp4"))


def option_text(option: str) -> str:
    """An option without its letter: "A. Red." -> "Red."."""
    return _OPTION_PREFIX.sub("", option, count=1).strip()


def letter_prompt(question: str, options: list[str]) -> str:
    """The question with its options listed, asking for a letter."""
    listed = " ".join(o if _OPTION_PREFIX.match(o) else f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return LETTER_PROMPT.format(question=question, options=listed)


def parse_letter(text: str, n_options: int) -> str | None:
    """The first standalone option letter in a generated answer ("B", "(B)", "B. blue", "The answer is B.")."""
    valid = LETTERS[:n_options]
    for m in re.finditer(r"(?<![A-Za-z])([A-J])(?![A-Za-z])", text):
        if m.group(1) in valid:
            return m.group(1)
    return None


def aggregate(records: list[dict], groups: Iterable[str] = GROUPS) -> dict:
    """Overall and per-group accuracy of each method, count and chance level of question records (each has
    `n_options`, `{method}_correct` and the group fields); NaN where there are no records."""

    def summary(rs: list[dict]) -> dict:
        out = {"count": len(rs), "chance": sum(1 / r["n_options"] for r in rs) / len(rs) if rs else math.nan}
        out.update({m: accuracy(rs, f"{m}_correct") for m in METHODS})
        return out

    report = {"overall": summary(records)}
    for g in groups:
        by: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            by[str(r.get(g) if r.get(g) is not None else "unknown")].append(r)
        report[f"by_{g}"] = {k: summary(v) for k, v in sorted(by.items())}
    return report


def _room(model, questions: list[dict], max_new_tokens: int) -> int:
    """Cache slots after the video that the longest question + answer of either method needs."""
    need = 0
    for q in questions:
        n_letter = len(model.codec.encode(letter_prompt(q["question"], q["options"]))) + max_new_tokens
        n_option = len(model.codec.encode(q["question"])) + max(
            len(model.codec.encode(fmt.answer_text(option_text(o)))) for o in q["options"]
        )
        need = max(need, n_letter, n_option)
    return need + 16  # the chat template's " ASSISTANT:" and tokenization slack


def evaluate(
    model,
    items: list[dict],
    video_dir: str | Path | None = None,
    *,
    report: JobReport | None = None,
    records: list[dict | None] | None = None,
    **options,
) -> dict:
    """Score every question with both methods (`options`: those of `score_videos`): `summarize` of the records.
    With `report`, bad inputs are recorded there and it is saved as each question is scored; `records` (one
    entry per item, None until scored) is filled in as they are, so a caller keeps them when a later error stops
    the run."""
    records = [None] * len(items) if records is None else records
    for i, record in score_videos(model, items, video_dir, report=report, **options):
        records[i] = record
        if report is not None:
            report.save()
    return summarize(records)


def summarize(records: list[dict | None]) -> dict:
    """`aggregate` of the scored records (None: not scored) with the count of questions and the records."""
    done = [r for r in records if r is not None]
    return {"questions": len(records), "scored": len(done), **aggregate(done), "records": done}


def score_videos(
    model,
    items: list[dict],
    video_dir: str | Path | None = None,
    *,
    max_new_tokens: int = 8,
    fps: float | None = None,
    num_frames: int | None = None,
    max_frames: int | None = None,
    progress: bool = True,
    report: JobReport | None = None,
) -> Iterator[tuple[int, dict]]:
    """(index in `items`, record) of each question as it is scored, video by video. With `report`, a video that
    cannot be read or a question that cannot be asked is recorded there (input: the video, with the ids of the
    questions left out) and the rest goes on; without it, the error is raised."""
    from tqdm import tqdm

    by_video: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for i, item in enumerate(items):
        by_video[video_uri(item, video_dir)].append((i, item))
    frames = dict(fps=fps, num_frames=num_frames, max_frames=max_frames)
    bar = tqdm(total=len(items), desc="eval-qa", unit="q", disable=not progress)
    for uri, questions in by_video.items():
        ids = [q.get("question_id", i) for i, q in questions]
        read = partial(_video_context, model, uri, questions, max_new_tokens, frames)
        video = attempt(report, uri, read, questions=ids)
        if video is None:  # recorded in the report: this video's questions are left out
            bar.update(len(questions))
            continue
        ctx, n_frames = video
        for (i, q), qid in zip(questions, ids, strict=True):
            record = attempt(
                report, uri, partial(score_question, model, ctx, q, max_new_tokens), questions=[qid]
            )
            bar.update()
            if record is not None:
                record.update(video=uri, frames=n_frames)
                yield i, record
    bar.close()


def _video_context(model, uri: str, questions: list[tuple[int, dict]], max_new_tokens: int, frames: dict):
    """The video's context with room for its questions, and its number of frames."""
    room = _room(model, [q for _, q in questions], max_new_tokens)
    codes = model.read_video(uri, reserve=room, **frames)
    return model.video_context(codes, room), len(codes)


def score_question(model, ctx, item: dict, max_new_tokens: int = 8) -> dict:
    """One question's record: both methods' choices and whether they are right."""
    options, answer = item["options"], str(item["answer"]).strip()
    scores = model.option_logprobs(ctx, item["question"], [option_text(o) for o in options])
    loglik = most_likely(LETTERS[: len(options)], scores)
    generated = model.answer(ctx, letter_prompt(item["question"], options), max_new_tokens=max_new_tokens)
    letter = parse_letter(generated, len(options))
    record = {k: item.get(k) for k in ("question_id", "videoID", "duration", "domain", "task_type")}
    record.update(
        question=item["question"],
        answer=answer,
        n_options=len(options),
        loglik_scores=scores,
        loglik_choice=loglik,
        loglik_correct=loglik == answer,
        generated=generated,
        letter_choice=letter,
        letter_correct=letter == answer,
    )
    return record
