"""Section train: one training step of the model at train_seq tokens on one device, attention.kernel=fused then
xla: step time, tokens/s, MFU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lvm.attention.ring import choose_kernel
from lvm.bench import common
from lvm.bench.gpu.measure import error_text
from lvm.bench.gpu.step import compile_step, derive_step, estimate_step_s, model_config, run_steps

if TYPE_CHECKING:
    from lvm.bench.gpu.budget import Section
    from lvm.bench.gpu.run import Run


def run_train(run: Run, section: Section) -> None:
    s = run.settings
    for kernel in ("fused", "xla"):
        row: dict[str, Any] = {"kernel": kernel, "seq_len": s.train_seq, "model": s.model}
        run.payload["train"].append(row)
        cfg = model_config(run, s.train_seq, kernel)
        compiled_before = [r["compile_s"] for r in run.payload["train"] if r.get("compile_s")]
        compile_est = max(compiled_before, default=2 * s.default_compile_s)
        slower = 1.0 if kernel == "fused" else 3.0  # the xla kernel's attention is several times slower
        estimate = 1.2 * compile_est + 4 * slower * estimate_step_s(run, cfg)
        if not section.allows(estimate, f"the {kernel} training step at {s.train_seq}"):
            row["skipped"] = section.notes[-1]
            continue
        try:
            step = compile_step(run, cfg)
            row.update(compile_s=step["compile_s"], memory=step["memory"], tiles=_model_tiles(run, cfg))
            # the max_context section starts its search from this compiled step
            run.state.setdefault("probes", {}).setdefault(kernel, {})[s.train_seq] = step
            row.update(run_steps(run, step, s.reps, 2 * s.case_timing_s))
            derive_step(run, row, cfg)
            print(
                f"  train {kernel} S={s.train_seq}: {common.fmt_seconds(row['step_s'])}/step, "
                f"{row['tokens_per_s']:.0f} tokens/s, MFU {row['mfu']:.1%} (compile {row['compile_s']:.1f} s)",
                flush=True,
            )
        except Exception as err:
            row["error"] = error_text(err)
            print(f"  train {kernel} error: {row['error'][:300]}", flush=True)
        finally:
            run.save()


def _model_tiles(run: Run, cfg) -> dict[str, Any]:
    """The attention kernel and forward/backward tiles the model's config resolves to on this backend."""
    m, a = cfg.model, cfg.attention
    target, fwd, bwd = choose_kernel(
        a.kernel, run.backend, cfg.train.seq_len, 1, a.layout, m.head_dim, a.q_chunk, a.kv_chunk
    )
    return {
        "kernel": "xla" if target is None else target.flavour,
        "forward": list(fwd),
        "backward": list(bwd),
    }
