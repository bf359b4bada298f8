"""Attention benchmark: dense vs blockwise vs ring attention (and the public reference), time, memory, FLOP/s.

For each sequence length it jit-compiles forward+backward (`jax.grad` of `sum(attention(q, k, v) * w)` with
respect to q, k and v) of

  * dense attention on one device (materialises the score matrix),
  * blockwise attention on one device (`sharded_attention` over a 1-device mesh, sp=1),
  * ring attention over sp = 2, 4, 8: causal with the zigzag (balanced) layout, causal with the contiguous
    (unbalanced) layout, and non-causal,
  * the public reference ring attention (PyPI ringattention 0.1.2, subprocess in `.venv-ref`) at the same
    settings (sp = 1, 2, 4, 8; causal and not; contiguous blocks, the only layout it has),

and records XLA's compiled per-device memory (temp + argument bytes) and wall time, and model FLOP/s as a
fraction of a plain matmul's FLOP/s measured in the same run. Writes OUT/attention.json, OUT/attention.png and
OUT/attention.md, and prints the table.

Modules: `cases` (sizes and settings), `measure` (ours in-process, the reference in a subprocess, derived
FLOP/s), `targets` (verdicts from result rows), `report` (tables, plot, files), `cli` (flags and the run).
"""

from lvm.bench.attention.cli import add_arguments, run

__all__ = ["add_arguments", "run"]
