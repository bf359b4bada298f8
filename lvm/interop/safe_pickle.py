"""Load a pickled parameter tree without running code: only plain containers and numpy arrays are admitted.

Unpickling calls whatever callables the file names, so LWM's VQGAN file (a pickle of the flax param dict) is read
with an `Unpickler` whose `find_class` admits only numpy's array reconstruction, `collections.OrderedDict`,
flax's `FrozenDict` (read as a dict) and jax arrays (rebuilt as numpy arrays without importing jax). Anything
else raises `UnsafePickleError` naming it; `load(..., trust=True)` is the explicit opt-out (`--trust-pickle`).
"""

from __future__ import annotations

import codecs
import collections
import pickle
from typing import BinaryIO

import ml_dtypes
import numpy as np


class UnsafePickleError(ValueError):
    """The pickle names a callable outside the allowlist."""


def _latin1_encode(text: str, encoding: str = "latin1"):
    """`_codecs.encode` as protocol-2 pickles use it for bytes; only the latin-1 codec."""
    if encoding.replace("-", "").lower() not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"pickle asks for codec {encoding!r}; only latin-1 bytes are admitted")
    return codecs.encode(text, "latin1")


def _jax_array(fun, args, arr_state, aval_state):
    """jax's `_reconstruct_array`, returning the numpy value (`fun` already passed the allowlist)."""
    arr = fun(*args)
    arr.__setstate__(arr_state)
    return arr


def _numpy_globals() -> dict:
    out = {}
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = np._core.multiarray._reconstruct
        out[(f"{core}.multiarray", "scalar")] = np._core.multiarray.scalar
        out[(f"{core}.numeric", "_frombuffer")] = np._core.numeric._frombuffer
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    return out


ALLOWED = {
    **_numpy_globals(),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_encode,
    ("flax.core.frozen_dict", "FrozenDict"): dict,
    ("jax._src.array", "_reconstruct_array"): _jax_array,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"the pickle refers to {module}.{name}, which is neither a plain container nor a numpy array; "
                "loading it would run code from the file. If you trust the file, pass --trust-pickle"
            ) from None


def load(f: BinaryIO, trust: bool = False):
    """Unpickle `f`: restricted to containers and arrays unless `trust`."""
    if trust:
        return pickle.Unpickler(f).load()
    return RestrictedUnpickler(f).load()
