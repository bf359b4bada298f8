"""One-GPU check (`scripts/gpu_check.sh`): matmul, fused attention against cuDNN, and the 1B model's training.

Sections, run in this order, each with its own time budget (seconds a section leaves unused go to the next one;
a section that runs short skips its remaining cases with a note saying why):

  matmul       bf16 [n, n] x [n, n] FLOP/s: the yardstick.
  attention    forward+backward of cuDNN's fused attention (`jax.nn.dot_product_attention`, "cudnn") and of ours
               through `sharded_attention` on a 1-device mesh: kernel "fused" (its default tiles) and kernel "xla"
               (q_chunk = kv_chunk = 2048); 8K, 32K and 128K tokens, causal and full, batch 1, 32 heads x 128,
               bf16. FLOP/s, ratios to the matmul and to cuDNN, and each kernel's gradients against cuDNN's.
  train        one training step of the 1B model (configs/model/1b.yaml) at 32K tokens on one GPU: tokens/s and
               MFU (lvm.metrics.flops_per_token), attention.kernel=fused, then xla.
  vqgan_encode the VQGAN's encode frames/s at the default config (256x256 frames, 16x16 codes) in calls of 8 and
               64 frames, and `lvm pretokenize`'s decode stage with 1 and the default number of worker processes
               (one per CPU but one) on a 720p clip at 1 fps: whether decoding keeps up with the encoder, and
               about how many workers would (needs decord, Pillow and ffmpeg; otherwise it says what is missing).
  max_context  the longest sequence whose 1B training step fits the GPU: XLA's compiled memory analysis of the
               step at doubling / predicted / bisected lengths against the device's memory, then one real step at
               the longest fitting length whose step time fits the budget.

Every measurement is compiled first and timed after a warm-up call (block_until_ready; median of a few calls).
OUT/gpu_check.json and OUT/gpu_check.md are rewritten after every measurement, so a run that is cut short keeps
what it measured. OUT defaults to docs/bench/<card>/ (card: h100, h200, ... from the device kind).

`--smoke` runs every path with tiny shapes (512 tokens, 2 heads x 64, configs/model/tiny.yaml with one layer); on
CPU the fused kernels run in Pallas interpret mode and XLA's attention stands in for cuDNN. Run as
`python -m lvm.bench.gpu [--smoke] [--out DIR]` with the repository root on PYTHONPATH. It is not an `lvm bench`
subcommand: that registry imports every benchmark module before jax may start, and this one imports jax.

Modules: `settings` (sizes, budgets, thresholds), `budget` (time budgets of the sections), `measure` (timing
one program), `run` (the run's results and its report files), the sections `matmul`, `attention`, `train` and
`max_context` (with `step`: the model's compiled training step), `vqgan_encode`, `targets` (verdicts from result
rows), `report` (the markdown), `cli` (flags and the section loop).

With only PYTHONPATH (no `pip install -e .`), `lvm.tokenizers` and `lvm.data_pipeline`, which pip maps from the
checkout's top-level `tokenizers/` and `data_pipeline/`, are mapped here when importing the package (`MAPPED`); not
in processes it starts, so the decode workers need the package installed.
"""

import time

# The run's deadline counts from here: the package is imported first, before jax starts its backend.
STARTED = time.perf_counter()
MAPPED: list[str] = []  # the packages mapped here (not installed)


def _map_checkout_packages() -> None:
    import importlib.util
    import pathlib
    import sys

    import lvm

    root = pathlib.Path(__file__).resolve().parents[3]
    for name in ("tokenizers", "data_pipeline"):
        full = f"lvm.{name}"
        if full in sys.modules or importlib.util.find_spec(full) is not None:
            continue  # installed (pip's mapping) or already imported
        folder = root / name
        spec = importlib.util.spec_from_file_location(
            full, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(lvm, name, module)
        MAPPED.append(full)


_map_checkout_packages()
