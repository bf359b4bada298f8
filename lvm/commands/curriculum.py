"""Run a staged curriculum (each stage starts from the previous one's params; reruns resume)."""

from __future__ import annotations

from lvm import distributed
from lvm.commands.train import EXIT_NONFINITE, EXIT_PREEMPTED, stop_on_nonfinite


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="curriculum file or name under configs/curriculum/")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[STAGE:]KEY=VALUE",
        help="override for every stage, or for one stage when prefixed by its name",
    )
    parser.add_argument(
        "--workdir", required=True, help="folder (local or gs://) of stages/NAME run folders and summary.json"
    )
    parser.add_argument("--init-from", help="start the first stage from this workdir's or export's params")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    distributed.add_arguments(parser)


def run(args) -> int:
    from lvm.curriculum import load_curriculum

    cur = load_curriculum(args.config, args.set)
    distributed.initialize(args, max(stage.cfg.mesh.min_devices() for stage in cur.stages))
    from lvm.curriculum import run_curriculum

    summary = stop_on_nonfinite(
        "curriculum",
        lambda: run_curriculum(cur, args.workdir, init_from=args.init_from, progress=not args.no_progress),
    )
    if summary is None:
        return EXIT_NONFINITE
    return 0 if summary["complete"] else EXIT_PREEMPTED
