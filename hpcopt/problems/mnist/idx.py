"""Reader (and a small writer, for tests and fixtures) for the IDX format of the MNIST files.

Layout: two zero bytes, a dtype code, the number of dimensions ``ndim``, then
``ndim`` big-endian uint32 sizes, then the array in C order, big-endian.  Files
are often gzipped; compression is detected from the gzip magic bytes, so a
decompressed file that kept its ``.gz`` name (or the reverse) still reads.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from hpcopt.errors import DataError

#: IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzipped or not, into a native-endian numpy array.

    Raises:
        DataError: the file cannot be read, is not IDX, or its size disagrees with its header;
            the message names the file and what is wrong.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, shorter than the 4-byte IDX magic number")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file: magic number starts with {raw[:2].hex()} instead of 0000")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise DataError(f"{path}: not an IDX file: unknown dtype code 0x{code:02x} (known: {known})")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{path}: truncated: header declares {ndim} dimensions ({header_len} header bytes), file has {len(raw)}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    found = len(raw) - header_len
    if found != expected:
        problem = "truncated" if found < expected else "trailing data"
        shape = "x".join(str(d) for d in dims) or "scalar"
        raise DataError(
            f"{path}: {problem}: header says {shape} {dtype.name} = {expected} bytes, "
            f"file has {found} after the {header_len}-byte header"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    # A native-endian, writable copy: torch.from_numpy refuses big-endian and read-only buffers.
    return data.astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated gzip data: {err}") from None


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` as IDX (gzipped when ``compress``); the inverse of :func:`read_idx`."""
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in codes:
        raise ValueError(f"write_idx: dtype {array.dtype} has no IDX code")
    big_endian = IDX_DTYPES[codes[native]]
    header = bytes([0, 0, codes[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=big_endian).tobytes()
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)
