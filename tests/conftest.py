"""Test set-up: 8 simulated CPU devices and the persistent compile cache, configured before jax is imported."""

import os
import pathlib

from lvm import cpu_devices

cpu_devices.simulate(8, cpu_only=True)
_cache = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import importlib.util  # noqa: E402
import sys  # noqa: E402

# torch is in the test environment only to check `lvm export-hf` in a subprocess. tensorboardX imports it when
# it can, and torch loaded beside jax's profiler crashed test workers (segfault in start_trace): keep it out.
TORCH_AVAILABLE = importlib.util.find_spec("torch") is not None
sys.modules.setdefault("torch", None)

import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 simulated CPU devices; jax was imported before conftest.py"


def make_mesh(shape, names=("dp", "fsdp", "tp", "sp")):
    """A mesh of the first prod(shape) devices with classic (Auto) axis types."""
    n = 1
    for s in shape:
        n *= s
    return jax.make_mesh(
        tuple(shape),
        tuple(names),
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
        devices=jax.devices()[:n],
    )


@pytest.fixture
def mesh_factory():
    return make_mesh
