"""`lvm train`: the training loop over a config's mesh, with Orbax checkpoints and exact resumption.

Run folder (`workdir`, a local path or a `gs://` URI; every file below lands there, written atomically):
    config.yaml        the resolved config            run.json       commit, package versions, devices per start
    metrics.jsonl      one record per step            eval.jsonl     validation loss by position bucket
    tb/                TensorBoard events              checkpoints/   Orbax steps (see lvm.checkpoint)
    data/              synthetic corpora, if any       summary.json   steps, tokens, final loss, seconds
    profile/           profiler trace (train.profile_steps)
    tokenizers.json    the tokenizers the corpora were made with (when they name them)
On gs://, the log files (metrics, eval, tb, profile) are staged locally and uploaded whole before each
checkpoint, at the end and every minute or so (see lvm.metrics); the rest are single whole-object writes.

Starting again with the same workdir resumes from the newest complete checkpoint: params, optimizer state,
step, RNG and the loader's position, so later steps see exactly the batches of an uninterrupted run. Without a
checkpoint, params come from `init_from` (a previous stage's workdir or an exported folder) or are initialised.
Checkpoints are saved every `train.checkpoint_every` steps and, with `train.checkpoint_minutes`, whenever that
much wall time has passed since the last one: process 0's clock decides and broadcasts, so every host saves at
the same step.
Params and optimizer state are created, restored and updated on their final shardings, so the step compiles
once. SIGTERM (TPU preemption) saves a checkpoint and stops; a non-finite loss stops with an error (leaving
the last checkpoint as it was) or skips the update, per `train.nonfinite`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lvm import checkpoint
from lvm.batch import batch_shardings
from lvm.config import Config, config_from_dict, config_to_dict
from lvm.data_pipeline import storage, synthetic
from lvm.data_pipeline.loader import Loader, LoaderConfig, Source
from lvm.metrics import MetricsWriter, flops_per_token, peak_flops
from lvm.model import (
    bucket_sums,
    init_opt_state,
    init_params,
    loss_from_sums,
    make_train_step,
    opt_state_shardings,
    param_shapes,
    param_shardings,
)
from lvm.optim import learning_rate, make_optimizer
from lvm.provenance import run_record
from lvm.sharding import make_mesh, replicated

SAVE_TRIES = 3  # tries to write one checkpoint (see Trainer._checkpoint_io)
SAVE_RETRY_S = 5.0


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf and `train.nonfinite` is "stop"."""


@dataclasses.dataclass
class RunResult:
    steps: int
    tokens: int
    final_loss: float | None
    seconds: float
    preempted: bool
    checkpoint_step: int | None
    val: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_main() -> bool:
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _agreed(flag: bool) -> bool:
    """Process 0's `flag` on every process (one small broadcast when there are several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.array(flag)))


def prepare_data(cfg: Config, workdir: str) -> tuple[tuple[Source, ...], str | None]:
    """Training sources and validation corpus; a synthetic task's corpora are written once, by process 0."""
    d = cfg.data
    if d.synthetic is None:
        weights = d.weights or (1.0,) * len(d.train)
        return tuple(Source(u, w) for u, w in zip(d.train, weights, strict=True)), d.val
    made = {}
    for split, n_docs in (("train", d.synthetic_docs), ("val", None)):
        seed = [d.seed, split == "val", d.synthetic_doc_len, d.synthetic_block]  # new documents per stage
        uri = storage.join(workdir, "data", split)
        n_docs = n_docs or max(d.synthetic_docs // 4, 1)
        if _is_main() and not storage.exists(storage.join(uri, "dataset.json")):
            vocab = cfg.model.text_vocab_size
            docs = synthetic.markov_copy_documents(
                n_docs, d.synthetic_doc_len, d.synthetic_block, vocab, seed
            )
            synthetic.write_corpus(uri, docs, vocab)
        made[split] = uri
    _barrier("lvm-synthetic-data")
    return (Source(made["train"]),), d.val or made["val"]


class Trainer:
    """One training run in `workdir` (a local path or gs:// URI); `run()` trains to `train.steps` (or until
    preempted). `clock` (seconds) times `train.checkpoint_minutes`."""

    def __init__(
        self,
        cfg: Config,
        workdir: str | Path,
        *,
        init_from: str | None = None,
        progress: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        mesh_cfg = cfg.check_training(jax.device_count())  # every impossible setting fails here
        self.cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
        self.mesh = make_mesh(mesh_cfg)
        self.workdir = checkpoint.resolve_uri(workdir)
        self.init_from = init_from
        self.progress = progress
        self.clock = clock
        self._last_save = clock()
        t = self.cfg.train
        self.optimizer = make_optimizer(t)
        self.lr = learning_rate(t)
        self.param_shardings = param_shardings(self.cfg, self.mesh)
        self.opt_shardings = opt_state_shardings(self.cfg, self.mesh, self.optimizer)
        self.train_step = make_train_step(self.cfg, self.mesh, self.optimizer)
        self.eval_step = jax.jit(
            partial(bucket_sums, cfg=self.cfg, mesh=self.mesh, n_buckets=t.eval_buckets),
            in_shardings=(self.param_shardings, batch_shardings(self.mesh)),
            out_shardings=replicated(self.mesh),
        )
        if _is_main():
            storage.makedirs(self.workdir)
        _barrier("lvm-workdir")
        self.sources, self.val = prepare_data(self.cfg, self.workdir)
        self.loader = Loader(self._loader_config(self.sources, t.batch_size, self.cfg.data.seed), self.mesh)
        self.checkpoints = checkpoint.Checkpointer(
            storage.join(self.workdir, "checkpoints"), keep=t.keep_checkpoints, cleanup=True
        )
        self.writer = MetricsWriter(self.workdir, enabled=_is_main())
        self.params = self.opt_state = None
        self.step = 0
        self.rng = jax.random.key(t.seed)
        self.seconds = 0.0  # training time over all starts of this run
        self.last_metrics: dict[str, Any] = {}
        self.val_result: dict | None = None
        self._preempt = False

    def _loader_config(self, sources, batch_size: int, seed: int) -> LoaderConfig:
        d = self.cfg.data
        return LoaderConfig(
            sources=sources,
            seq_len=self.cfg.train.seq_len,
            batch_size=batch_size,
            seed=seed,
            overlong=d.overlong,
            shuffle_window=d.shuffle_window,
            prefetch=d.prefetch,
            cache_dir=d.cache_dir,
        )

    # Start: resume, warm-start or initialise -------------------------------------------------------------------

    def _abstract(self):
        params = checkpoint.abstract_tree(param_shapes(self.cfg.model), self.param_shardings)
        opt = jax.eval_shape(self.optimizer.init, param_shapes(self.cfg.model))
        return params, checkpoint.abstract_tree(opt, self.opt_shardings)

    def start(self) -> int:
        """Restore the newest checkpoint, else warm-start from `init_from`, else initialise; returns the step."""
        self._record_start()
        latest = self.checkpoints.latest_step()
        abstract_params, abstract_opt = self._abstract()
        if latest is not None:
            meta = self.checkpoints.restore_meta(latest)
            checkpoint.check_same_shapes(
                config_from_dict(meta["config"]), self.cfg, storage.join(self.workdir, "checkpoints")
            )
            self.params, self.opt_state, meta = self.checkpoints.restore(
                latest, abstract_params, abstract_opt
            )
            self.loader.set_state(meta["data"])
            self.rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
            self.step, self.seconds = meta["step"], meta["seconds"]
            self.last_metrics = meta.get("metrics", {})
        else:
            if self.init_from:
                self.params = checkpoint.load_params(self.init_from, self.cfg, self.mesh, abstract_params)
            else:
                self.rng, key = jax.random.split(self.rng)
                self.params = init_params(self.cfg, self.mesh, key)
            self.opt_state = init_opt_state(self.cfg, self.mesh, self.optimizer, self.params)
        self.writer.resume(self.step)  # the logs keep the steps up to here; later ones are trained again
        return self.step

    def _record_start(self) -> None:
        if not _is_main():
            return
        checkpoint.write_config(self.workdir, self.cfg)
        tokenizers = {k: c.header.get(k) for c in self.loader.corpora for k in ("text_tokenizer", "vqgan")}
        if any(tokenizers.values()):  # what inference needs to read this model's tokens
            checkpoint.write_tokenizers(self.workdir, tokenizers)
        path = storage.join(self.workdir, "run.json")
        runs = json.loads(storage.read_text(path)) if storage.exists(path) else {"starts": []}
        runs["starts"].append({**run_record(), "step": self.checkpoints.latest_step() or 0})
        storage.write_bytes(path, json.dumps(runs, indent=1).encode())

    # The loop ----------------------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Train until `train.steps` (or SIGTERM); save checkpoints; return the run's result."""
        from tqdm import tqdm

        t = self.cfg.train
        if self.params is None:
            self.start()
        tokens_per_step = t.batch_size * t.seq_len
        peak = peak_flops(jax.devices()[0].device_kind, t.peak_flops)
        flops = flops_per_token(self.cfg) * tokens_per_step
        bar = tqdm(total=t.steps, initial=self.step, disable=not (self.progress and _is_main()), desc="train")
        self._last_save = self.clock()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            while self.step < t.steps and not self._preempted():
                self._profile(self.step)
                batch = next(self.loader)
                t0 = time.perf_counter()
                self.params, self.opt_state, metrics = self.train_step(self.params, self.opt_state, batch)
                metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                self.step += 1
                self.seconds += dt
                if not metrics.pop("finite"):
                    self._on_nonfinite(metrics)
                record = self._record(metrics, dt, tokens_per_step, flops, peak)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self.writer.write("metrics", record)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                bar.update()
                if t.eval_every and self.step % t.eval_every == 0 and self.val:
                    self.evaluate()
                if self.step % t.checkpoint_every == 0 or self.step == t.steps or self._time_to_save():
                    self.save()
            preempted = self.step < t.steps
            if preempted and self.checkpoints.latest_step() != self.step:
                self.save()
            if not preempted and self.val and (self.val_result or {}).get("step") != self.step:
                self.evaluate()
            self._checkpoint_io(self.checkpoints.wait)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._profile(None)
            bar.close()
            self.checkpoints.wait()
            self.writer.flush()
        result = RunResult(
            steps=self.step,
            tokens=self.step * tokens_per_step,
            final_loss=self.last_metrics.get("loss"),
            seconds=self.seconds,
            preempted=preempted,
            checkpoint_step=self.checkpoints.latest_step(),
            val=self.val_result,
        )
        if _is_main():
            storage.write_bytes(
                storage.join(self.workdir, "summary.json"), json.dumps(result.to_dict(), indent=1).encode()
            )
        return result

    def _record(self, metrics: dict, dt: float, tokens: int, flops: float, peak: float | None) -> dict:
        record = {"step": self.step, **metrics, "lr": float(self.lr(self.step - 1))}
        record["tokens_per_s"] = tokens / dt
        record["mfu"] = flops / dt / (peak * jax.device_count()) if peak else None
        record["step_s"] = dt
        self.last_metrics = record
        return record

    def _time_to_save(self) -> bool:
        """`train.checkpoint_minutes` have passed since the last checkpoint, by process 0's clock."""
        minutes = self.cfg.train.checkpoint_minutes
        return bool(minutes) and _agreed(self.clock() - self._last_save >= 60 * minutes)

    def save(self) -> None:
        """Start an asynchronous checkpoint of the current step (the logs up to it are uploaded first)."""
        self._last_save = self.clock()
        self.writer.flush()
        self._checkpoint_io(self._start_save)

    def _start_save(self) -> None:
        meta = {
            "step": self.step,
            "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
            "data": self.loader.get_state(),
            "config": config_to_dict(self.cfg),
            "seconds": self.seconds,
            "metrics": self.last_metrics,
        }
        self.checkpoints.save(self.step, self.params, self.opt_state, meta)

    def _checkpoint_io(self, action: Callable[[], None]) -> None:
        """`action()`: start a save, or wait for the one in flight. When it fails, or the asynchronous write
        before it did (its error comes out here), the current step is saved again and waited for, up to
        `SAVE_TRIES` tries `SAVE_RETRY_S` apart: storage trouble that outlasts the clients' own retries costs a
        checkpoint, not the run. A failed step never counts (it lacks Orbax's completion mark) and is removed
        on the next start. Several processes would have to agree on a retry: they stop instead (rerun to resume
        from the newest complete checkpoint)."""
        for attempt in range(1, SAVE_TRIES + 1):
            try:
                action()
                return
            except Exception as err:
                if jax.process_count() > 1 or attempt == SAVE_TRIES:
                    raise
                cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
                print(
                    f"lvm train: warning: writing a checkpoint failed ({type(err).__name__}: {cause}); saving "
                    f"step {self.step} again in {SAVE_RETRY_S:g} s (try {attempt + 1} of {SAVE_TRIES})",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(SAVE_RETRY_S)
                self.checkpoints.reload()  # forget the failed step
                action = lambda: (self._start_save(), self.checkpoints.wait())

    def _on_nonfinite(self, metrics: dict) -> None:
        what = f"step {self.step}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}"
        if self.cfg.train.nonfinite == "skip":
            print(f"lvm train: {what} is not finite; the update was skipped", flush=True)
            return
        self.checkpoints.wait()
        last = self.checkpoints.latest_step()
        kept = (
            f"the last good checkpoint (step {last}) is intact" if last is not None else "no checkpoint yet"
        )
        where = storage.join(self.workdir, "checkpoints")
        raise NonFiniteLossError(
            f"{what} is not finite; stopped without saving ({kept} under {where}). "
            "Lower train.lr or raise train.warmup_steps, check the data, or set train.nonfinite=skip"
        )

    def evaluate(self) -> dict:
        """Validation loss and perplexity over `eval_batches` fixed batches, by position bucket."""
        t = self.cfg.train
        loader = Loader(self._loader_config((Source(self.val),), t.microbatch, seed=0), self.mesh)
        sums = np.zeros((t.eval_buckets, 4))
        try:
            for _ in range(t.eval_batches):
                sums += np.asarray(jax.device_get(self.eval_step(self.params, next(loader))))
        finally:
            loader.close()
        loss, parts = loss_from_sums(sums)
        width = t.seq_len // t.eval_buckets
        buckets = []
        for i, (ts, tn, vs, vn) in enumerate(sums.tolist()):
            ce = (ts + vs) / (tn + vn) if tn + vn else None  # None: no targets at these positions
            ppl = float(np.exp(ce)) if ce is not None else None
            buckets.append(
                {"start": i * width, "end": (i + 1) * width, "loss": ce, "ppl": ppl, "tokens": tn + vn}
            )
        self.val_result = {
            "step": self.step,
            "loss": float(loss),
            "ppl": float(np.exp(loss)),
            "text_loss": float(parts["text_loss"]),
            "vision_loss": float(parts["vision_loss"]),
            "buckets": buckets,
        }
        flat = {k: v for k, v in self.val_result.items() if k != "buckets"}
        flat.update({f"loss_pos_{b['start']}": b["loss"] for b in buckets if b["loss"] is not None})
        self.writer.write("eval", flat)
        return self.val_result

    # Signals and profiling ---------------------------------------------------------------------------------------

    def _on_sigterm(self, signum, frame) -> None:
        self._preempt = True

    def _preempted(self) -> bool:
        if jax.process_count() == 1:
            return self._preempt
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self._preempt))))

    def _profile(self, step: int | None) -> None:
        window = self.cfg.train.profile_steps
        if not window:
            return
        if step == window[0]:
            jax.profiler.start_trace(self.writer.local_dir("profile"))  # uploaded by the next flush on gs://
            self._tracing = True
        elif getattr(self, "_tracing", False) and (step is None or step >= window[1]):
            jax.profiler.stop_trace()
            self._tracing = False
            self.writer.flush()

    def close(self) -> None:
        self.loader.close()
        self.checkpoints.close()
        self.writer.close()


def train(
    cfg: Config, workdir: str | Path, *, init_from: str | None = None, progress: bool = True
) -> RunResult:
    """Train `cfg` in `workdir` (resuming it if it holds checkpoints); see `Trainer`."""
    trainer = Trainer(cfg, workdir, init_from=init_from, progress=progress)
    try:
        return trainer.run()
    finally:
        trainer.close()
