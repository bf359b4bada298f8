"""What the attention benchmark writes: the progress lines, the results and targets tables, the plot, and
OUT/attention.json, OUT/attention.png and OUT/attention.md."""

from __future__ import annotations

import pathlib
from typing import Any

from lvm.bench import common

# Plot/table order and labels of the settings.
SERIES = (
    ("dense", "dense (1 device)"),
    ("blockwise", "blockwise (sp=1)"),
    ("ring-zigzag", "ring zigzag"),
    ("ring-contiguous", "ring contiguous"),
    ("ring", "ring"),
    ("reference", "reference"),
)

NOTES = [
    "Time: forward+backward wall time (jax.grad of sum(attention(q, k, v) * w) w.r.t. q, k, v), minimum over "
    "the timed calls after one warm-up call (interference on shared cores only adds time); the median is "
    "recorded too, and so is the process CPU time of each call (all threads; 'CPU time' in the table), which "
    "other work on the machine disturbs far less than wall time.",
    "Memory: XLA's compiled memory analysis of that program for ONE device (an SPMD program describes one "
    "device): per_device_bytes = temp + argument bytes; output, alias and peak bytes are recorded as well.",
    "Model FLOPs: forward 4*S^2*D*H per batch element, half when causal; backward counted as 2x forward, so "
    "fwd+bwd = 3x forward. Kernels that skip masked tiles still compute the diagonal tiles in full and the "
    "backward recomputes the scores, so hardware FLOPs exceed model FLOPs.",
    "Matmul fraction: attention model FLOP/s over the FLOP/s of one plain [n, n] x [n, n] matmul of the same "
    "dtype on one device, measured at the start and at the end of the run (the faster is used). 'per CPU-s' "
    "divides FLOPs by process CPU seconds (all threads) on both sides instead: robust to other load, and it "
    "neither rewards nor punishes using more cores.",
    "Sequence parallelism on a CPU host: the sp 'devices' are simulated (XLA_FLAGS "
    "--xla_force_host_platform_device_count) and all share the same cpu_count cores, so a ring over sp devices "
    "reports the TOTAL time of all devices' work, not one device's time on a real cluster, and per-device "
    "memory is what one device of a real ring would need. Timings on time-shared cores cannot show load "
    "balance; the balanced-layout test counts computed tiles instead.",
    "Layouts: causal ring runs use zigzag (balanced) or contiguous (unbalanced) token layouts; non-causal rings "
    "use contiguous (no imbalance to fix). The reference only has contiguous blocks.",
]

# target key -> its row title in the targets table, in table order
TARGET_TITLES = {
    "causal_about_half": "causal ~ half of non-causal",
    "ring_no_slower_than_blockwise": "ring (max sp) <= blockwise (sp=1)",
    "faster_and_leaner_than_reference": "faster than reference, less memory/device",
    "attention_60pct_of_matmul": "attention >= 60% of matmul FLOP/s",
}


def _mask(row) -> str:
    return "causal" if row["causal"] else "full"


def progress_line(row: dict[str, Any]) -> str:
    """One measured (or failed) setting, printed as the run goes."""
    what = f"{row['series']:<16} S={row['seq_len']:<6} sp={row['sp']} {_mask(row):<6}"
    return f"  {what} " + (common.fmt_seconds(row["time_s"]) if row.get("time_s") else row["error"])


def notes(settings: dict[str, Any], skipped_sp: list[int], n_devices: int) -> list[str]:
    """NOTES plus what this run left out."""
    out = list(NOTES)
    if any(s > settings["dense_max_len"] for s in settings["seq_lens"]):
        out.append(
            f"Dense attention was skipped above {settings['dense_max_len']} tokens (--dense-max-len): it "
            "materialises the S x S score matrix and its backward, which is slow and large on this host."
        )
    if skipped_sp:
        out.append(f"sp values {skipped_sp} skipped: only {n_devices} devices (jax was started with fewer).")
    return out


def results_table(results) -> str:
    """Every row: by length, causal first, in SERIES order."""
    order = {name: i for i, (name, _) in enumerate(SERIES)}
    rows = sorted(
        results,
        key=lambda r: (
            r["seq_len"],
            not r["causal"],
            order.get(r.get("series"), 99),
            r["sp"],
            str(r.get("layout")),
        ),
    )
    body = []
    for r in rows:
        mem = r.get("memory") or {}
        body.append(
            [
                r["seq_len"],
                dict(SERIES).get(r.get("series"), r.get("series")),
                r["sp"],
                _mask(r),
                r.get("layout") or "-",
                f"{r['q_chunk']}" if r.get("q_chunk") else "-",
                common.fmt_seconds(r["time_s"]) if r.get("time_s") else f"error: {r.get('error', '?')[:60]}",
                common.fmt_seconds(r.get("cpu_s")),
                f"{r['flops_per_s'] / 1e9:.1f}" if r.get("flops_per_s") else "-",
                f"{100 * r['matmul_fraction']:.0f}%" if r.get("matmul_fraction") else "-",
                f"{100 * r['matmul_fraction_cpu']:.0f}%" if r.get("matmul_fraction_cpu") else "-",
                common.fmt_bytes(mem.get("temp_bytes")),
                common.fmt_bytes(mem.get("per_device_bytes")),
            ]
        )
    headers = [
        "seq",
        "implementation",
        "sp",
        "mask",
        "layout",
        "chunk",
        "fwd+bwd",
        "CPU time",
        "GFLOP/s",
        "of matmul",
        "per CPU-s",
        "temp/dev",
        "temp+args/dev",
    ]
    return common.markdown_table(headers, body)


def targets_table(targets) -> str:
    """One row a target: its title, the reason of its verdict, and the verdict."""
    rows = []
    for key, title in TARGET_TITLES.items():
        t = targets[key]
        measured = t["reason"]
        cpu = t.get("best_per_cpu_second")
        if cpu:  # the matmul target: the CPU-time view beside the wall-time verdict
            best = f"{100 * cpu['matmul_fraction_cpu']:.0f}% ({cpu['series']}, sp={cpu['sp']})"
            measured += f"; per CPU-second: best {best}"
        rows.append([title, measured, common.fmt_met(t["met"])])
    return common.markdown_table(["target (largest sequence length)", "measured", "met"], rows)


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def header(machine: dict[str, Any], settings: dict[str, Any], matmul: dict[str, Any]) -> str:
    """The line above the tables: machine, shapes, the matmul yardstick and the load during the run."""
    simulated = "simulated " if machine["simulated_cpu_devices"] else ""
    return (
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, jax {machine['jax_version']} "
        f"{machine['backend']} with {machine['device_count']} {simulated}devices; "
        f"batch {settings['batch']}, {settings['heads']} heads x {settings['head_dim']}, {settings['dtype']}; "
        f"matmul {matmul['n']}^3 = {matmul['flops_per_s'] / 1e9:.1f} GFLOP/s; load average (1/5/15 min) "
        f"{_load(machine.get('load_average_start'))} at start, {_load(machine.get('load_average_end'))} at end."
    )


def plot(results, settings, matmul, path) -> None:
    """Time, per-device memory and matmul fraction against length; causal on the top row, full below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5), constrained_layout=True)
    styles = {"dense": "k", "blockwise": "C0", "ring-zigzag": "C1", "ring-contiguous": "C2", "ring": "C1"}
    markers = {1: "o", 2: "s", 4: "^", 8: "D"}
    for row_i, causal in enumerate((True, False)):
        lines: dict[tuple, list] = {}
        for r in results:
            if r["causal"] != causal or not r.get("time_s"):
                continue
            lines.setdefault((r["series"], r["sp"]), []).append(r)
        for (series, sp), rows in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            rows.sort(key=lambda r: r["seq_len"])
            x = [r["seq_len"] for r in rows]
            label = dict(SERIES).get(series, series) + (
                "" if series in ("dense", "blockwise") else f" sp={sp}"
            )
            color = "C3" if series == "reference" else styles.get(series, "C4")
            ls = "--" if series == "reference" else (":" if series == "ring-contiguous" else "-")
            kw = dict(color=color, linestyle=ls, marker=markers.get(sp, "x"), label=label, alpha=0.9)
            axes[row_i, 0].plot(x, [r["time_s"] for r in rows], **kw)
            axes[row_i, 1].plot(x, [r["memory"]["per_device_bytes"] / 2**20 for r in rows], **kw)
            axes[row_i, 2].plot(x, [100 * r["matmul_fraction"] for r in rows], **kw)
        mask = "causal" if causal else "non-causal"
        axes[row_i, 0].set(
            title=f"{mask}: forward+backward time", ylabel="seconds", xscale="log", yscale="log"
        )
        axes[row_i, 1].set(
            title=f"{mask}: per-device memory (temp + args)", ylabel="MiB", xscale="log", yscale="log"
        )
        axes[row_i, 2].set(
            title=f"{mask}: model FLOP/s as % of matmul", ylabel="% of matmul FLOP/s", xscale="log"
        )
        axes[row_i, 2].axhline(60, color="gray", linestyle=":", linewidth=1)
        for ax in axes[row_i]:
            ax.set_xlabel("global sequence length")
            ax.set_xticks(settings["seq_lens"], [str(s) for s in settings["seq_lens"]])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
        axes[row_i, 2].legend(fontsize=7, ncol=2, loc="best")
    fig.suptitle(
        f"Attention fwd+bwd, batch {settings['batch']}, {settings['heads']} heads x {settings['head_dim']}, "
        f"{settings['dtype']}; matmul {matmul['n']}^3: {matmul['flops_per_s'] / 1e9:.0f} GFLOP/s; "
        "sp>1 on simulated CPU devices sharing the same cores (time = total over devices)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out_dir: pathlib.Path, payload: dict[str, Any]) -> str:
    """Write attention.json, attention.png and attention.md into out_dir; returns the markdown's text."""
    common.write_json(out_dir / "attention.json", payload)
    settings, matmul, results = payload["settings"], payload["matmul"], payload["results"]
    plot(results, settings, matmul, out_dir / "attention.png")
    text = "\n\n".join(
        [
            header(payload["machine"], settings, matmul),
            results_table(results),
            targets_table(payload["targets"]),
        ]
    )
    (out_dir / "attention.md").write_text(text + "\n")
    return text
