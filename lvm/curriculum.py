"""Staged curricula: a YAML file of stages, each a full `Config`, run one after another by `run_curriculum`.

File layout (under `configs/curriculum/` or any path):

    include: [model/tiny]          config files merged first (names under configs/ or paths)
    defaults:                      sections shared by every stage (model, attention, mesh, train, data)
      train: {lr: 3.0e-3}
    stages:                        in order; each stage's sections override the defaults
      - name: 1k
        mesh: 1,8,1,1
        model: {rope_theta: 10000}
        train: {seq_len: 1024, steps: 40}

`key=value` overrides given on the command line apply to every stage (`train.steps=5`), or to one stage when
prefixed with its name (`1k:train.steps=5`). Every stage is validated when the file is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from lvm import schema
from lvm.config import CONFIG_DIR, Config, ConfigError, load_config
from lvm.data_pipeline import storage

KEYS = ("include", "defaults", "stages")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    cfg: Config


@dataclasses.dataclass(frozen=True)
class Curriculum:
    name: str
    path: Path
    stages: tuple[Stage, ...]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"curriculum {self.name!r} has no stage {name!r}; stages: {self.stage_names}")

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]


def resolve_curriculum_path(name: str | Path) -> Path:
    """A curriculum YAML: an existing file, or a name under configs/curriculum/ (e.g. "tiny")."""
    path = Path(name)
    if path.is_file():
        return path
    return schema.resolve_path(f"curriculum/{name}" if "/" not in str(name) else name, CONFIG_DIR)


def load_curriculum(name: str | Path, overrides: Sequence[str] = ()) -> Curriculum:
    """Load and validate every stage of a curriculum file."""
    path = resolve_curriculum_path(name)
    data = schema.parse_yaml(path) or {}
    if not isinstance(data, Mapping) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ConfigError(f"{path}: a curriculum file needs a non-empty list `stages` (see lvm.curriculum)")
    unknown = set(data) - set(KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; valid: {', '.join(KEYS)}")
    base: dict = {}
    for inc in data.get("include") or []:
        base = schema.merge(base, schema.read_yaml(Config, schema.resolve_path(inc, CONFIG_DIR)))
    base = schema.merge(base, data.get("defaults") or {})
    names = [s.get("name") if isinstance(s, Mapping) else None for s in data["stages"]]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"{path}: every stage needs a unique string `name`; got {names}")
    for o in overrides:
        prefix, sep, _ = o.partition(":")
        if sep and "=" not in prefix and prefix not in names:
            raise ConfigError(f"override {o!r} names stage {prefix!r}; stages: {names}")
    stages = []
    for raw in data["stages"]:
        sections = schema.merge(base, {k: v for k, v in raw.items() if k != "name"})
        mine = [
            o.partition(":")[2] if _stage_of(o) else o
            for o in overrides
            if _stage_of(o) in (None, raw["name"])
        ]
        try:
            cfg = schema.load_data(Config, sections, mine)
        except ConfigError as err:
            raise ConfigError(f"{path}, stage {raw['name']!r}: {err}") from None
        stages.append(Stage(raw["name"], cfg))
    return Curriculum(path.stem, path, tuple(stages))


def resolve_config(
    configs: Sequence[str | Path], stage: str | None, overrides: Sequence[str] = ()
) -> tuple[Config, str | None]:
    """(Config, stage name) of the command-line flags `--config ... [--stage S] [--set ...]`.

    One `--config` that names a curriculum gives its stage `stage` (which may be left out when the curriculum
    has one stage); otherwise the configs are YAML files merged in order (later ones win) and `stage` must be
    None.
    """
    curriculum_path = None
    if len(configs) == 1:
        try:
            path = resolve_curriculum_path(configs[0])
            if "stages" in (schema.parse_yaml(path) or {}):
                curriculum_path = path
        except FileNotFoundError:
            pass
    if curriculum_path is None:
        if stage is not None:
            raise ConfigError(
                f"--stage {stage!r} needs exactly one --config naming a curriculum (configs/curriculum/), "
                f"got {[str(c) for c in configs]}"
            )
        return load_config(configs, overrides), None
    curriculum = load_curriculum(curriculum_path, overrides)
    if stage is None:
        if len(curriculum.stages) != 1:
            raise ConfigError(
                f"curriculum {curriculum.name!r} has stages {curriculum.stage_names}; pick one with --stage"
            )
        stage = curriculum.stages[0].name
    return curriculum.stage(stage).cfg, stage


def _stage_of(override: str) -> str | None:
    prefix, sep, _ = override.partition(":")
    return prefix if sep and "=" not in prefix else None


def _stage_done(stage_dir: str, stage: Stage) -> dict | None:
    try:
        result = json.loads(storage.read_text(storage.join(stage_dir, "summary.json")))
    except FileNotFoundError:
        return None
    return result if not result["preempted"] and result["steps"] >= stage.cfg.train.steps else None


def _write_summary(workdir: str, summary: dict) -> None:
    storage.write_bytes(storage.join(workdir, "summary.json"), json.dumps(summary, indent=1).encode())


def run_curriculum(
    cur: Curriculum, workdir: str | Path, *, init_from: str | None = None, progress: bool = True
) -> dict:
    """Train the stages in order under `workdir/stages/NAME` (`workdir` local or gs://), each from the previous
    stage's final params.

    Finished stages are skipped; an unfinished one resumes from its newest checkpoint. Writes and returns
    `workdir/summary.json`: {"curriculum", "complete", "stages": {name: {steps, tokens, final_loss, seconds,
    val_loss, workdir}}}; prints a table at the end."""
    import jax

    from lvm.checkpoint import resolve_uri
    from lvm.trainer import train

    workdir = resolve_uri(workdir)
    for stage in cur.stages:  # every stage's settings are checked before the first compile
        try:
            stage.cfg.check_training(jax.device_count())
        except ConfigError as err:
            raise ConfigError(f"stage {stage.name!r}: {err}") from None
    summary: dict = {"curriculum": cur.name, "complete": False, "stages": {}}
    previous = init_from
    for stage in cur.stages:
        stage_dir = storage.join(workdir, "stages", stage.name)
        result = _stage_done(stage_dir, stage)
        if result is not None:
            print(f"stage {stage.name}: already finished, skipped", flush=True)
        else:
            print(f"stage {stage.name}: {_describe(stage.cfg)}", flush=True)
            result = train(stage.cfg, stage_dir, init_from=previous, progress=progress).to_dict()
        summary["stages"][stage.name] = {
            "steps": result["steps"],
            "tokens": result["tokens"],
            "final_loss": result["final_loss"],
            "seconds": result["seconds"],
            "val_loss": (result.get("val") or {}).get("loss"),
            "workdir": stage_dir,
        }
        if jax.process_index() == 0:
            _write_summary(workdir, summary)
        if result["preempted"]:
            print(f"stage {stage.name}: preempted at step {result['steps']}; rerun to continue", flush=True)
            return summary
        previous = stage_dir
    summary["complete"] = True
    if jax.process_index() == 0:
        _write_summary(workdir, summary)
        print(format_table(summary), flush=True)
    return summary


def _describe(cfg: Config) -> str:
    t = cfg.train
    return (
        f"seq_len {t.seq_len}, batch {t.batch_size}, rope_theta {cfg.model.rope_theta:g}, mesh {cfg.mesh}, "
        f"{t.steps} steps"
    )


def format_table(summary: dict) -> str:
    """The per-stage summary as a text table."""
    rows = [("stage", "steps", "tokens", "final loss", "val loss", "seconds")]
    for name, s in summary["stages"].items():
        val = f"{s['val_loss']:.4f}" if s["val_loss"] is not None else "-"
        loss = f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "-"
        rows.append((name, str(s["steps"]), f"{s['tokens']:,}", loss, val, f"{s['seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
