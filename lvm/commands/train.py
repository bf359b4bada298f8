"""Train a model from a config (resumes from the workdir's newest checkpoint)."""

from __future__ import annotations

import json
import sys

from lvm import distributed

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run stopped early and saved a checkpoint; rerun to continue
EXIT_NONFINITE = 3


def add_arguments(parser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="config file or name under configs/ (repeatable, later ones win); with --stage, a curriculum",
    )
    parser.add_argument("--stage", help="train this stage of the curriculum given as --config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument(
        "--workdir", required=True, help="run folder (local or gs://): checkpoints, logs, summary.json"
    )
    parser.add_argument("--init-from", help="start from this workdir's or `lvm export` folder's params")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(parser)


def load(args):
    """The Config the flags describe."""
    from lvm.curriculum import resolve_config

    return resolve_config(args.config, args.stage, args.set)[0]


def stop_on_nonfinite(command: str, fn):
    """`fn()`, or None after printing one error line when the loss became NaN/inf."""
    from lvm.trainer import NonFiniteLossError

    try:
        return fn()
    except NonFiniteLossError as err:
        print(f"lvm {command}: error: {err}", file=sys.stderr)
        return None


def run(args) -> int:
    cfg = load(args)  # a bad config fails before jax starts
    distributed.initialize(args, cfg.mesh.min_devices())
    from lvm.trainer import train

    result = stop_on_nonfinite(
        "train", lambda: train(cfg, args.workdir, init_from=args.init_from, progress=not args.no_progress)
    )
    if result is None:
        return EXIT_NONFINITE
    print(json.dumps(result.to_dict()))
    return EXIT_PREEMPTED if result.preempted else 0
