"""Multi-process start-up: one JAX process per host (TPU VM worker, GPU node, or CPU process)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    """The multi-host flags shared by `lvm train` and `lvm curriculum`."""
    group = parser.add_argument_group("multi-host")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with auto-detection (Cloud TPU pod slices, SLURM)",
    )
    group.add_argument(
        "--coordinator", help="HOST:PORT of process 0 (explicit start-up for CPU/GPU clusters)"
    )
    group.add_argument("--num-processes", type=int, help="total processes (with --coordinator)")
    group.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")


def initialize(args, devices_needed: int = 1) -> None:
    """Start jax.distributed as the flags ask; a single process needs none of them. Call before jax is imported:
    a single process on a machine without accelerators gets `devices_needed` simulated CPU devices (as `lvm demo`
    does; an XLA_FLAGS device count already set is kept, and on GPU/TPU the count changes nothing)."""
    from lvm import cpu_devices

    if not (args.coordinator or args.distributed):
        cpu_devices.simulate(devices_needed, keep=True)
    import jax  # not at module level: `lvm` builds every command's parser before any command runs

    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif args.distributed:
        jax.distributed.initialize()
