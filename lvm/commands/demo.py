"""The demo: synthetic long-video QA from mp4s to a trained model answering questions (see lvm.demo.run)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--gcs", action="store_true", help="pre-tokenize to gs:// on a loopback GCS server")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the videos, the questions and the models (default: %(default)s)",
    )
    parser.add_argument(
        "--lights-out",
        action="store_true",
        help="add a second event (the lights go out) and before/after questions (lowers colour/shape accuracy)",
    )


def run(args) -> int:
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    from lvm.demo.run import Demo, DemoConfig

    results = Demo(args.out, DemoConfig(seed=args.seed, lights_out=args.lights_out), gcs=args.gcs).run()
    return 0 if results["final_accuracy"] >= 0.9 else 1
