"""Write NIfTI-1 files that reuse a reference file's header, so geometry reads back bit for bit.

Only the fields that describe the voxel *values* (data type, bit depth, scaling, display range,
intent) are changed; dimensions, pixdim, qform/sform and units stay exactly as in the reference.
Anything unusual (NIfTI-2, big-endian, 4D) falls back to SimpleITK's writer.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
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


# ---------------------------------------------------------------------------------------------------
# Reading the raw payload (what SimpleITK's reader hides: truncation, NaN/Inf, zero pixdim)
# ---------------------------------------------------------------------------------------------------

#: bytes per voxel of each NIfTI datatype code; the float ones are checked for NaN/Inf.
_VOXEL_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                1536: 16, 1792: 16, 2048: 32, 2304: 4}
_FLOAT_CODES = {16: "f4", 64: "f8"}
_CHUNK = 1 << 24


class NiftiFacts:
    """What the raw file says: header fields and what the payload scan found (see :func:`scan`)."""

    def __init__(self, dims: tuple[int, ...], pixdim: tuple[float, ...], datatype: int, expected_bytes: int,
                 payload_bytes: int, nonfinite: int, stream_error: str | None) -> None:
        self.dims = dims                      # dim[1..dim[0]]
        self.pixdim = pixdim                  # pixdim[1..dim[0]]
        self.datatype = datatype
        self.expected_bytes = expected_bytes  # voxel data the header declares
        self.payload_bytes = payload_bytes    # voxel data actually present (capped at expected)
        self.nonfinite = nonfinite            # NaN/Inf values among float voxels
        self.stream_error = stream_error      # gzip stream damaged (CRC, early end), else None


def _parse_header(head: bytes) -> tuple[str, int, tuple[int, ...], tuple[float, ...], int, int, int] | None:
    """(endian, header size, dims, pixdim, datatype, vox_offset, bitpix) of a NIfTI-1/2 header, or None."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            ndim = struct.unpack(endian + "h", head[40:42])[0]
            if not 1 <= ndim <= 7:
                return None
            dims = struct.unpack(endian + "7h", head[42:56])[:ndim]
            datatype = struct.unpack(endian + "h", head[70:72])[0]
            pixdim = struct.unpack(endian + "7f", head[80:108])[:ndim]
            vox_offset = int(struct.unpack(endian + "f", head[108:112])[0])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            return endian, 348, dims, pixdim, datatype, max(vox_offset, 348), bitpix
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            ndim = struct.unpack(endian + "q", head[16:24])[0]
            if not 1 <= ndim <= 7:
                return None
            dims = struct.unpack(endian + "7q", head[24:80])[:ndim]
            datatype = struct.unpack(endian + "h", head[12:14])[0]
            pixdim = struct.unpack(endian + "7d", head[112:168])[:ndim]
            vox_offset = int(struct.unpack(endian + "q", head[168:176])[0])
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            return endian, 540, dims, pixdim, datatype, max(vox_offset, 540), bitpix
    return None


def _is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def scan(path: str | os.PathLike) -> NiftiFacts | None:
    """Read a single-file NIfTI (.nii / .nii.gz) to the end without SimpleITK; None if it is not one.

    Why: SimpleITK's NIfTI reader fills a truncated payload with zeros, reads NaN/Inf as 0 and takes
    pixdim 0 as 1 mm, so a damaged file looks clean through it. Reading the gzip stream to its end also
    checks its CRC. ``OSError`` (permissions, I/O errors) propagates.
    """
    gz = _is_gzip(path)
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
        try:
            head = fh.read(540)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            return NiftiFacts((), (), 0, 1, 0, 0, f"damaged gzip stream ({exc})")
        parsed = _parse_header(head)
        if parsed is None:
            return None
        endian, _, dims, pixdim, datatype, vox_offset, bitpix = parsed
        count = 1
        for d in dims:
            count *= max(int(d), 0)
        if int(datatype) in _VOXEL_BYTES:
            expected = count * _VOXEL_BYTES[int(datatype)]
        else:  # a type this table does not know: trust the header's bits per voxel
            expected = (count * max(int(bitpix), 0) + 7) // 8
        dtype = np.dtype(endian + _FLOAT_CODES[datatype]) if datatype in _FLOAT_CODES else None
        skip = vox_offset - len(head)
        buffered = head[vox_offset:] if skip < 0 else b""
        stream_error = None
        got, nonfinite, rest = 0, 0, b""
        try:
            if skip > 0:
                fh.read(skip)
            chunk = buffered
            while True:
                if chunk:
                    take = chunk[: max(0, expected - got)]
                    got += len(take)
                    if dtype is not None and take:
                        data = rest + take
                        usable = len(data) // dtype.itemsize * dtype.itemsize
                        values = np.frombuffer(data[:usable], dtype)
                        nonfinite += values.size - int(np.count_nonzero(np.isfinite(values)))
                        rest = data[usable:]
                if got >= expected and not gz:
                    break
                chunk = fh.read(_CHUNK)
                if not chunk:
                    break
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            stream_error = f"damaged gzip stream ({' '.join(str(exc).split()) or type(exc).__name__})"
    return NiftiFacts(tuple(int(d) for d in dims), tuple(float(p) for p in pixdim), int(datatype), expected,
                      got, nonfinite, stream_error)

