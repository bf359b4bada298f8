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
    from lvm import cpu_devices

    cpu_devices.simulate(8, cpu_only=True, keep=True)
    from lvm.demo.run import Demo, DemoConfig

    results = Demo(args.out, DemoConfig(seed=args.seed, lights_out=args.lights_out), gcs=args.gcs).run()
    return 0 if results["final_accuracy"] >= 0.9 else 1
