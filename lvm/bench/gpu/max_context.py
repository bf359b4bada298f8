"""Section max_context: the longest sequence whose training step fits the device's memory.

XLA's compiled memory analysis of the step is compared with USABLE_MEMORY of the device's memory limit at
doubling, then predicted (a straight line through the probes), then bisected lengths; then one real step runs at
the longest fitting length whose estimated step time fits the budget.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

from lvm.bench import common
from lvm.bench.gpu.measure import device_memory_limit, error_text
from lvm.bench.gpu.settings import USABLE_MEMORY
from lvm.bench.gpu.step import compile_step, derive_step, estimate_step_s, model_config, run_steps

if TYPE_CHECKING:
    from lvm.bench.gpu.budget import Section
    from lvm.bench.gpu.run import Run


def next_probe(peaks: dict[int, int], usable: float, step: int, longest: int) -> int | None:
    """The next length to compile, or None when the search is done.

    `peaks`: compiled peak bytes by length. Below the first fitting length and above the last: halve / double
    until a second point exists, then go to the length a straight line through the two longest probes predicts
    (rounded down to `step`), kept strictly inside the bracket of the longest fitting and shortest failing
    length, so every probe narrows it; done when the bracket is one `step` wide or the line's length is probed.
    """
    fits = [n for n, p in peaks.items() if p <= usable]
    over = [n for n, p in peaks.items() if p > usable]  # a length that failed to compile has peak inf
    lo, hi = max(fits, default=0), min(over, default=None)
    if hi is not None and hi - lo <= step:
        return None
    line = sorted((n, p) for n, p in peaks.items() if p != float("inf"))[-2:]
    if len(line) < 2:
        guess = 2 * lo if lo else hi // 2
    else:
        (n1, p1), (n2, p2) = line
        slope = (p2 - p1) / (n2 - n1)
        guess = int(n2 + (usable - p2) / slope) if slope > 0 else 2 * n2
    guess = max(guess // step * step, lo + step)
    if hi is not None:
        guess = min(guess, hi - step)
    guess = min(guess, longest // step * step)
    return None if guess <= lo or guess in peaks else guess


def run_max_context(run: Run, section: Section) -> None:
    """Search the longest fitting length (result in run.payload["max_context"]), then confirm it trains."""
    s = run.settings
    limit = run.memory_limit or device_memory_limit()
    result: dict[str, Any] = {"memory_limit_bytes": limit, "usable_fraction": USABLE_MEMORY, "probes": []}
    run.payload["max_context"] = result
    probes = run.state.setdefault("probes", {})
    # the fused kernel, unless its training step failed in the train section and none of it compiled
    kernel = "fused" if probes.get("fused") or "fused" not in _failed_train_kernels(run) else "xla"
    result["kernel"] = kernel
    steps = probes.setdefault(kernel, {})
    if s.train_seq not in steps and section.allows(
        2.4 * s.default_compile_s, f"compiling the step at {s.train_seq}"
    ):
        _probe(run, result, steps, model_config(run, s.train_seq, kernel))
    if limit is None:  # a backend without an allocator limit (CPU): the search still runs, against a stand-in
        if not steps:
            result["why_not"] = "no device memory limit and no compiled step"
            return
        limit = int(2 * min(steps.values(), key=lambda p: p["memory"]["peak_bytes"])["memory"]["peak_bytes"])
        result.update(
            memory_limit_bytes=limit, memory_limit_source="stand-in: 2 x the first probe (no limit)"
        )
    else:
        result["memory_limit_source"] = "--memory-limit-bytes" if run.memory_limit else "device bytes_limit"
    usable = USABLE_MEMORY * limit
    for n, step in sorted(steps.items()):
        _record_probe(result, n, step, usable)
    while True:
        peaks = {p["seq_len"]: p.get("peak_bytes", float("inf")) for p in result["probes"]}
        n = next_probe(peaks, usable, s.context_step, s.context_max)
        compiled = [p["compile_s"] for p in result["probes"] if "compile_s" in p]  # not the failed ones
        compile_est = 1.2 * max(compiled, default=2 * s.default_compile_s)
        if n is None or not section.allows(compile_est, f"compiling the step at {n}"):
            break
        _probe(run, result, steps, model_config(run, n, kernel), usable)
    _summarise_probes(result, usable)
    run.save()
    confirm_longest(run, section, result, steps)


def _failed_train_kernels(run: Run) -> set[str]:
    """Kernels whose step failed in the train section."""
    return {r["kernel"] for r in run.payload["train"] if r.get("error")}


def _probe(run: Run, result, steps, cfg, usable: float | None = None) -> None:
    """Compile the step of cfg into `steps` and, once the usable memory is known, record it as a probe; a step
    that fails to compile is recorded as a probe with an error (the search then treats it as too big)."""
    n = cfg.train.seq_len
    try:
        steps[n] = compile_step(run, cfg)
        if usable is not None:
            _record_probe(result, n, steps[n], usable)
    except Exception as err:
        result["probes"].append({"seq_len": n, "error": error_text(err)})
    run.save()


def _record_probe(result, n: int, step, usable: float) -> None:
    """A compiled step's peak bytes and whether they fit, kept in length order."""
    peak = step["memory"]["peak_bytes"]
    result["probes"].append(
        {"seq_len": n, "peak_bytes": peak, "fits": peak <= usable, "compile_s": step["compile_s"]}
    )
    result["probes"].sort(key=lambda p: p["seq_len"])
    print(
        f"  max context: S={n} needs {common.fmt_bytes(peak)} ({'fits' if peak <= usable else 'too big'})",
        flush=True,
    )


def _summarise_probes(result, usable: float) -> None:
    """The bracket the probes found and the straight line through the two longest compiled ones."""
    ok = [p for p in result["probes"] if p.get("peak_bytes")]
    fits = [p["seq_len"] for p in ok if p["fits"]]
    over = [p["seq_len"] for p in ok if not p["fits"]]
    result["fits_up_to"] = max(fits, default=None)
    result["too_big_from"] = min(over, default=None)
    if len(ok) >= 2:
        (n1, p1), (n2, p2) = ((p["seq_len"], p["peak_bytes"]) for p in ok[-2:])
        slope = (p2 - p1) / (n2 - n1)
        result["bytes_per_token"] = slope
        result["bytes_at_zero_tokens"] = p2 - slope * n2
        result["predicted_max"] = int(n2 + (usable - p2) / slope) if slope > 0 else None


def confirm_longest(run: Run, section: Section, result, steps) -> None:
    """One real step at the longest fitting length whose estimated time fits the budget (longer ones first)."""
    trained = {
        r["seq_len"] for r in run.payload["train"] if r.get("step_s") and r["kernel"] == result["kernel"]
    }
    lengths = sorted((p["seq_len"] for p in result["probes"] if p.get("fits")), reverse=True)
    for n in lengths:
        if n in trained:
            result["confirmed"] = {"seq_len": n, "by": "the train section's step"}
            break
        step = steps[n]
        estimate = estimate_step_s(run, step["cfg"])
        if not section.allows(1.3 * estimate + 5, f"running one step at {n} (confirming it trains)"):
            result.setdefault("not_run", []).append({"seq_len": n, "estimated_step_s": estimate})
            continue
        row: dict[str, Any] = {"seq_len": n}
        try:
            gc.collect()
            row.update(run_steps(run, step, 0, 0.0))
            row["step_s"] = row["warmup_s"]  # the first call of a compiled step: one-time costs included
            derive_step(run, row, step["cfg"])
            result["confirmed"] = {**row, "by": "one step run here"}
            print(f"  max context: one step at S={n} ran in {row['step_s']:.1f} s", flush=True)
            break
        except Exception as err:
            result.setdefault("failed_runs", []).append({"seq_len": n, "error": error_text(err)})
        finally:
            run.save()
