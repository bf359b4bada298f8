"""LWM's params files (tux `StreamingCheckpointer`): read record by record without loading payloads; write them.

The file is msgpack records one after another, no header or index. A record is `[key, value]`: key a list of
str (the flax `flatten_dict` path), value a msgpack bin holding `flax.serialization.to_bytes(leaf)`, itself a
msgpack document: ExtType(1, packb([shape, dtype name, C-order bytes])) or, for a leaf over 2**30 bytes, a map
`{'__msgpack_chunked_array__': True, 'shape': {'0': d0, ...}, 'chunks': {'0': ExtType(1, 1-D chunk), ...}}`.

`scan` parses only headers and seeks past every array payload, so it returns each record's key, shape, dtype
and the (offset, nbytes) of its payload pieces in file order; `RecordReader` then reads a record's flat bytes
in any block size. Memory stays at one block, whatever the file holds. `write` produces the same bytes flax
and tux do (tests and benchmarks use it), streaming each array's bytes instead of packing a record in memory.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Mapping
from typing import BinaryIO

import ml_dtypes
import numpy as np

ARRAY_EXT = 1  # flax's msgpack ExtType code of an ndarray
CHUNKED = "__msgpack_chunked_array__"
MAX_CHUNK_BYTES = 2**30  # flax.serialization.MAX_CHUNK_SIZE: leaves strictly larger are chunked


def dtype_from_name(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


@dataclasses.dataclass(frozen=True)
class Record:
    """One leaf: its key path, shape, dtype, and where its C-order bytes lie in the file (pieces in order)."""

    key: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: tuple[tuple[int, int], ...]  # (file offset, nbytes)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.pieces)


class _Cursor:
    """A binary file with its position tracked; `skip` seeks forward."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.pos = f.tell()

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError(f"truncated params file: wanted {n} bytes at offset {self.pos}, got {len(data)}")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        self.pos += n
        self.f.seek(self.pos)

    def at_end(self) -> bool:
        data = self.f.read(1)
        if data:
            self.f.seek(self.pos)
        return not data


_FIXED = {  # header byte -> (kind, struct format of its length/value)
    0xC4: ("bin", ">B"), 0xC5: ("bin", ">H"), 0xC6: ("bin", ">I"),
    0xC7: ("ext", ">B"), 0xC8: ("ext", ">H"), 0xC9: ("ext", ">I"),
    0xCA: ("float", ">f"), 0xCB: ("float", ">d"),
    0xCC: ("int", ">B"), 0xCD: ("int", ">H"), 0xCE: ("int", ">I"), 0xCF: ("int", ">Q"),
    0xD0: ("int", ">b"), 0xD1: ("int", ">h"), 0xD2: ("int", ">i"), 0xD3: ("int", ">q"),
    0xD9: ("str", ">B"), 0xDA: ("str", ">H"), 0xDB: ("str", ">I"),
    0xDC: ("array", ">H"), 0xDD: ("array", ">I"), 0xDE: ("map", ">H"), 0xDF: ("map", ">I"),
}  # fmt: skip
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


def _header(c: _Cursor) -> tuple[str, object]:
    """(kind, value) of the next msgpack item: the value of a scalar, the length of a container, str or bin;
    for ext, (length, type code)."""
    b = c.read(1)[0]
    if b <= 0x7F or b >= 0xE0:
        return "int", b if b <= 0x7F else b - 256
    if 0x80 <= b <= 0x8F:
        return "map", b & 0x0F
    if 0x90 <= b <= 0x9F:
        return "array", b & 0x0F
    if 0xA0 <= b <= 0xBF:
        return "str", b & 0x1F
    if b in (0xC0, 0xC2, 0xC3):
        return "const", {0xC0: None, 0xC2: False, 0xC3: True}[b]
    if b in _FIXEXT:
        return "ext", (_FIXEXT[b], c.read(1)[0])
    if b not in _FIXED:
        raise ValueError(f"not an LWM params file: unknown msgpack byte 0x{b:02x} at offset {c.pos - 1}")
    kind, fmt = _FIXED[b]
    (value,) = struct.unpack(fmt, c.read(struct.calcsize(fmt)))
    if kind == "ext":
        value = (value, c.read(1)[0])
    return kind, value


def _value(c: _Cursor):
    """A small msgpack value (keys, shapes, dtype names): never used on array payloads."""
    kind, v = _header(c)
    if kind in ("int", "float", "const"):
        return v
    if kind == "str":
        return c.read(v).decode()
    if kind == "bin":
        return c.read(v)
    if kind == "array":
        return [_value(c) for _ in range(v)]
    if kind == "map":
        return {_value(c): _value(c) for _ in range(v)}
    raise ValueError(f"unexpected msgpack ext at offset {c.pos}")


def _array_doc(c: _Cursor, header=None) -> tuple[tuple[int, ...], np.dtype, tuple[int, int]]:
    """Parse ExtType(1, [shape, dtype, bytes]) at the cursor (its header already read when given); skip the
    bytes. Returns (shape, dtype, piece)."""
    kind, v = header or _header(c)
    if kind != "ext" or v[1] != ARRAY_EXT:
        raise ValueError(f"expected a flax ndarray (msgpack ExtType 1) at offset {c.pos}, got {kind} {v}")
    if _header(c) != ("array", 3):
        raise ValueError(f"malformed flax ndarray at offset {c.pos}")
    shape, name = tuple(_value(c)), _value(c)
    kind, n = _header(c)
    if kind != "bin":
        raise ValueError(f"malformed flax ndarray payload at offset {c.pos}")
    dtype = dtype_from_name(name.decode() if isinstance(name, bytes) else name)
    piece = (c.pos, n)
    c.skip(n)
    return shape, dtype, piece


def _record(c: _Cursor) -> Record:
    if _header(c) != ("array", 2):
        raise ValueError(f"not an LWM params file: no [key, value] record at offset {c.pos}")
    key = tuple(_value(c))
    kind, n = _header(c)
    if kind != "bin":
        raise ValueError(f"record {'/'.join(key)}: value is {kind}, not a flax to_bytes payload")
    end = c.pos + n
    kind, v = _header(c)
    if kind == "ext":
        shape, dtype, piece = _array_doc(c, (kind, v))
        rec = Record(key, shape, dtype, (piece,))
    elif kind == "map":
        fields, pieces, dtype = {}, [], None
        for _ in range(v):
            name = _value(c)
            if name != "chunks":
                fields[name] = _value(c)
                continue
            if "shape" not in fields:
                raise ValueError(f"record {'/'.join(key)}: chunked array lists its chunks before its shape")
            kind, n_chunks = _header(c)
            for i in range(n_chunks):
                if _value(c) != str(i):
                    raise ValueError(f"record {'/'.join(key)}: chunks out of order")
                _, dtype, piece = _array_doc(c)
                pieces.append(piece)
        if not fields.get(CHUNKED):
            raise ValueError(f"record {'/'.join(key)}: a map that is not a flax chunked array")
        shape = tuple(fields["shape"][str(i)] for i in range(len(fields["shape"])))
        rec = Record(key, shape, dtype, tuple(pieces))
    else:
        raise ValueError(f"record {'/'.join(key)}: holds a {kind}, not an array")
    if c.pos != end:
        raise ValueError(f"record {'/'.join(key)}: payload length mismatch")
    if rec.nbytes != int(np.prod(rec.shape)) * rec.dtype.itemsize:
        raise ValueError(f"record {'/'.join(key)}: {rec.nbytes} bytes for shape {rec.shape} {rec.dtype}")
    return rec


def scan(f: BinaryIO) -> Iterator[Record]:
    """Every record of an open params file, in file order, parsing headers only (payloads are skipped)."""
    c = _Cursor(f)
    while not c.at_end():
        yield _record(c)


class RecordReader:
    """Sequential reads of one record's flat C-order bytes, across its chunks."""

    def __init__(self, f: BinaryIO, record: Record):
        self.f, self.pieces, self.i, self.done = f, list(record.pieces), 0, 0

    def read(self, n: int) -> np.ndarray:
        """The next `n` bytes as a uint8 array (one allocation)."""
        out = np.empty(n, np.uint8)
        view, filled = memoryview(out), 0
        while filled < n:
            offset, size = self.pieces[self.i]
            take = min(n - filled, size - self.done)
            if self.done == 0 or self.f.tell() != offset + self.done:
                self.f.seek(offset + self.done)
            got = _readinto(self.f, view[filled : filled + take])
            if got != take:
                raise ValueError(f"truncated params file at offset {offset + self.done}")
            filled, self.done = filled + take, self.done + take
            if self.done == size:
                self.i, self.done = self.i + 1, 0
        return out


def _readinto(f: BinaryIO, view: memoryview) -> int:
    total = 0
    while total < len(view):
        n = f.readinto(view[total:])
        if not n:
            break
        total += n
    return total


# ----------------------------------------------------------------------------------------------------------
# Writing (the same bytes as tux's `packer.pack((key, flax.serialization.to_bytes(leaf)))`)


def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return struct.pack(">BB", 0xC4, n)
    return struct.pack(">BH", 0xC5, n) if n < 2**16 else struct.pack(">BI", 0xC6, n)


def _ext_header(n: int) -> bytes:
    for code, size in _FIXEXT.items():
        if n == size:
            return struct.pack(">BB", code, ARRAY_EXT)
    if n < 2**8:
        return struct.pack(">BBB", 0xC7, n, ARRAY_EXT)
    if n < 2**16:
        return struct.pack(">BHB", 0xC8, n, ARRAY_EXT)
    return struct.pack(">BIB", 0xC9, n, ARRAY_EXT)


def _pack(obj) -> bytes:
    import msgpack

    return msgpack.packb(obj, use_bin_type=True)


def _array_doc_parts(arr: np.ndarray) -> list:
    """ExtType(1, packb([shape, dtype, bytes])) as a list of byte strings and the array itself (no copy)."""
    head = _pack([list(arr.shape), arr.dtype.name]) + _bin_header(arr.nbytes)
    head = b"\x93" + head[1:]  # a 3-item array: shape, dtype name, then the bin that follows
    return [_ext_header(len(head) + arr.nbytes), head, arr]


def write(f: BinaryIO, leaves: Mapping[tuple[str, ...], np.ndarray], max_chunk_bytes: int = MAX_CHUNK_BYTES):
    """Write `leaves` (key path -> array) as an LWM params file; arrays over `max_chunk_bytes` are chunked."""
    for key, arr in leaves.items():
        arr = np.ascontiguousarray(arr)
        if arr.nbytes > max_chunk_bytes:
            flat = arr.reshape(-1)
            step = max(1, max_chunk_bytes // arr.itemsize)
            chunks = [flat[i : i + step] for i in range(0, flat.size, step)]
            parts = [_pack({CHUNKED: True, "shape": {str(i): d for i, d in enumerate(arr.shape)}})]
            parts[0] = bytes([parts[0][0] + 1]) + parts[0][1:]  # the map gets a third entry: chunks
            parts.append(_pack("chunks") + _map_header(len(chunks)))
            for i, chunk in enumerate(chunks):
                parts += [_pack(str(i)), *_array_doc_parts(chunk)]
        else:
            parts = _array_doc_parts(arr)
        size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        f.write(b"\x92" + _pack(list(key)) + _bin_header(size))
        for p in parts:
            f.write(p if isinstance(p, bytes) else memoryview(p.reshape(-1).view(np.uint8)))


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else struct.pack(">BH", 0xDE, n)
