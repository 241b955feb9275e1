"""Write NIfTI-1 files that reuse a reference file's header, so geometry reads back bit for bit.

Only the fields that describe the voxel *values* (data type, bit depth, scaling, display range,
intent) are changed; dimensions, pixdim, qform/sform and units stay exactly as in the reference.
Anything unusual (NIfTI-2, big-endian, 4D) falls back to SimpleITK's writer.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

NIFTI_ENDINGS = (".nii", ".nii.gz")
_DTYPES = {np.dtype(np.uint8): (2, 8), np.dtype(np.int16): (4, 16), np.dtype(np.int32): (8, 32),
           np.dtype(np.float32): (16, 32), np.dtype(np.float64): (64, 64), np.dtype(np.int8): (256, 8),
           np.dtype(np.uint16): (512, 16), np.dtype(np.uint32): (768, 32)}


def _is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_ENDINGS)


def _open(path: str | os.PathLike):
    return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")


def read_header(path: str | os.PathLike) -> bytes | None:
    """The 348-byte little-endian NIfTI-1 header of ``path``, or None if it is not one."""
    try:
        with _open(path) as fh:
            header = fh.read(348)
    except (OSError, EOFError):
        return None
    if len(header) != 348 or struct.unpack("<i", header[:4])[0] != 348 or header[344:347] not in (b"n+1", b"ni1"):
        return None
    return header


def can_copy_header(reference: str | os.PathLike, output: str | os.PathLike, geometry) -> bool:
    if not (_is_nifti(reference) and _is_nifti(output)) or not Path(reference).is_file():
        return False
    header = read_header(reference)
    if header is None:
        return False
    dims = struct.unpack("<8h", header[40:56])
    if dims[0] < 3 or any(d not in (0, 1) for d in dims[4 : dims[0] + 1]):
        return False
    return tuple(dims[1:4]) == tuple(geometry.size)


def write_with_header(array: np.ndarray, reference: str | os.PathLike, path: str | os.PathLike, compress: bool) -> None:
    """``array`` is in SimpleITK order (z, y, x), i.e. NIfTI's x-fastest memory order."""
    header = bytearray(read_header(reference))
    dtype = np.dtype(array.dtype).newbyteorder("=")
    if dtype == np.dtype(np.int64):
        dtype = np.dtype(np.int32)
    if dtype == np.dtype(bool):
        dtype = np.dtype(np.uint8)
    code, bitpix = _DTYPES[np.dtype(dtype.name)]
    dims = list(struct.unpack("<8h", header[40:56]))
    dims[0] = 3
    dims[4:] = [1, 1, 1, 1]
    header[40:56] = struct.pack("<8h", *dims)
    header[56:70] = struct.pack("<3fh", 0.0, 0.0, 0.0, 0)          # intent parameters and code
    header[70:74] = struct.pack("<hh", code, bitpix)
    header[108:120] = struct.pack("<3f", 352.0, 1.0, 0.0)         # vox_offset, scl_slope, scl_inter
    header[124:132] = struct.pack("<2f", 0.0, 0.0)                # cal_max, cal_min
    header[344:348] = b"n+1\x00"
    payload = bytes(header) + b"\x00\x00\x00\x00" + np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    if str(path).lower().endswith(".gz") or (compress and str(path).lower().endswith(".gz")):
        with gzip.open(path, "wb", compresslevel=1 if compress else 0) as fh:
            fh.write(payload)
    else:
        Path(path).write_bytes(payload)
