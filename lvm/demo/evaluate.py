"""The demo's QA evaluation: option log-likelihood over each question's options, per stage, per needle depth,
baselines. Scores and heatmaps come from `lvm.evals`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lvm.demo import scenes
from lvm.evals.scores import accuracy, accuracy_by_depth_bin, depth_bin_labels, most_likely

QUARTERS = 4  # accuracy is reported per quarter of needle depth


class Evaluator:
    """Scores held-out sets with one model; video codes are cached across models (encoding is the same)."""

    def __init__(self, room: int, fps: int):
        self.room, self.fps = room, fps
        self.codes: dict[str, np.ndarray] = {}

    def videos(self, model, items: list[dict]) -> Iterator[np.ndarray]:
        """Codes of each item's video in turn: cached, or read through one decoder process for the whole set."""
        todo = [v for v in dict.fromkeys(item["video"] for item in items) if v not in self.codes]
        # lazy: the decoder starts at the first uncached video, so a fully cached set starts none
        with contextlib.closing(model.read_videos(todo, fps=self.fps)) as fresh:
            for item in items:
                if item["video"] not in self.codes:
                    self.codes[item["video"]] = next(fresh)
                yield self.codes[item["video"]]

    def predict(self, model, ctx, kind: str) -> str:
        question, options = scenes.QUESTIONS[kind]
        return most_likely(options, model.option_logprobs(ctx, question, scenes.options_text(kind)))

    def run(self, model, items: list[dict], desc: str, baselines: bool = False) -> dict:
        """Accuracy over every question of every item: the four-option questions (colour, shape) make the
        headline `accuracy` and the depth quarters, the order question is reported under `order`. With
        `baselines`, also question-only and mismatched-video (item i's questions asked of item i+1's video)
        accuracy of each."""
        records, mismatched = [], []
        videos = self.videos(model, items)
        for i, (item, codes) in enumerate(zip(tqdm(items, desc=desc, leave=False), videos, strict=True)):
            ctx = model.video_context(codes, self.room)
            for kind in (k for k in scenes.QUESTIONS if k in item):
                pred = self.predict(model, ctx, kind)
                records.append({"video": item["video"], "kind": kind, "depth": item["depth"],
                                "answer": item[kind], "pred": pred, "correct": pred == item[kind]})  # fmt: skip
                if baselines and i > 0 and kind in items[i - 1]:  # the previous item's question of this video
                    mismatched.append({"kind": kind, "correct": pred == items[i - 1][kind]})
        asked = [k for k in scenes.QUESTIONS if any(r["kind"] == k for r in records)]
        four = [r for r in records if r["kind"] in scenes.FOUR_OPTION]
        order = [r for r in records if r["kind"] == "order"]
        out = {
            "questions": len(four),
            "accuracy": accuracy(four),
            "by_kind": {k: accuracy([r for r in records if r["kind"] == k]) for k in asked},
            "by_depth_quarter": accuracy_by_depth_bin(four, QUARTERS),
            "records": records,
        }
        if order:
            out["order"] = {
                "questions": len(order),
                "accuracy": accuracy(order),
                "chance": scenes.chance("order"),
            }
        if baselines:
            only = []
            for kind in asked:
                question, options = scenes.QUESTIONS[kind]
                guess = most_likely(
                    options, model.question_only_logprobs(question, scenes.options_text(kind))
                )
                only += [{"kind": kind, "correct": guess == item[kind]} for item in items if kind in item]
            for key, rows in (("question_only", only), ("mismatched_video", mismatched)):
                out[key] = accuracy([r for r in rows if r["kind"] in scenes.FOUR_OPTION])
                if order:
                    out["order"][key] = accuracy([r for r in rows if r["kind"] == "order"])
        return out


def evaluate_stages(
    out: Path, stages, summary: dict, sp: str, vq: str, *, room: int, fps: int, mesh: str
) -> dict:
    """Each stage's model (from the curriculum's `summary`) on its own held-out set under `out/videos`, the final
    model also with baselines and on every set (the needle heatmap); the final model is exported with its
    tokenizers `sp` and `vq`."""
    from lvm.cli import run_command
    from lvm.evals.needle import plot_heatmap
    from lvm.inference import load_model

    ev = Evaluator(room, fps)
    sets = {s.name: json.loads((out / "videos" / s.name / "eval" / "eval.json").read_text()) for s in stages}
    results: dict = {"stages": {}}
    final = None
    for s in stages:
        stage_dir = summary["stages"][s.name]["workdir"]
        model = load_model(stage_dir, mesh=mesh)
        r = ev.run(model, sets[s.name], f"eval {s.name}", baselines=s is stages[-1])
        print(f"stage {s.name}: accuracy {r['accuracy']:.3f} on {r['questions']} held-out questions")
        results["stages"][s.name] = {
            "seq_len": s.seq_len, "steps": summary["stages"][s.name]["steps"],
            "final_loss": summary["stages"][s.name]["final_loss"], "accuracy": r["accuracy"],
            "questions": r["questions"], "by_kind": r["by_kind"], "frames_per_video": sets[s.name][0]["frames"],
        }  # fmt: skip
        final = (model, r, stage_dir)
    model, r, stage_dir = final
    rows = {f"{s.seq_len}": ev.run(model, sets[s.name], f"heatmap {s.name}")["by_depth_quarter"]
            for s in stages[:-1]}  # fmt: skip
    rows[f"{stages[-1].seq_len}"] = r["by_depth_quarter"]
    quarters = depth_bin_labels(QUARTERS)
    grid = {"mode": "held-out QA", "unit": "tokens", "lengths": [int(n) for n in rows],
            "depths": [q / QUARTERS for q in range(QUARTERS)], "accuracy": list(rows.values())}  # fmt: skip
    heatmap = plot_heatmap(
        grid, out / "needle_heatmap.png", "final model: held-out QA accuracy", depth_labels=quarters
    )
    export = out / "export"
    run_command(
        "export", ["--workdir", stage_dir, "--out", str(export), "--text-tokenizer", sp, "--vqgan", vq]
    )
    results.update(
        final={
            k: r[k]
            for k in (
                "questions",
                "accuracy",
                "by_kind",
                "by_depth_quarter",
                "question_only",
                "mismatched_video",
                "order",
            )
            if k in r
        },
        final_accuracy=r["accuracy"],
        chance=scenes.chance(scenes.FOUR_OPTION[0]),
        needle_grid={"rows": rows, "columns": quarters},
        heatmap=str(heatmap),
        checkpoint=str(export.resolve()),
        vqgan=str(Path(vq).resolve()),
        text_tokenizer=str(Path(sp).resolve()),
    )
    (out / "eval_records.json").write_text(json.dumps(r["records"], indent=1))
    return results
