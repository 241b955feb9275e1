"""Image I/O that keeps geometry exact, and the canonical axis order used inside heartcascade.

All reading and writing goes through SimpleITK. A prediction is written with the *input's* size,
spacing, origin and direction copied from the image that was read, so geometry round-trips exactly
whatever the scan's orientation.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from heartcascade.dataset import nifti_header
from heartcascade.utils.atomic import atomic_path
from heartcascade.utils.errors import HCError

IMAGE_ENDINGS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
# Spacing ratio (thickest / second thickest) above which the thick axis is the acquisition's slice axis.
ANISOTROPY_RATIO = 1.5


@dataclass(frozen=True)
class Geometry:
    """The physical placement of a voxel grid (SimpleITK index order: x, y, z)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(tuple(int(v) for v in d["size"]), tuple(float(v) for v in d["spacing"]),
                   tuple(float(v) for v in d["origin"]), tuple(float(v) for v in d["direction"]))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        if tuple(image.GetSize()) != self.size:
            raise HCError(f"array of size {image.GetSize()} cannot take geometry of size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def mismatch(self, other: "Geometry", tol: float = 1e-4) -> str | None:
        """Describe the first difference beyond ``tol`` (relative for spacing, mm for origin), else None."""
        if self.size != other.size:
            return f"size {self.size} vs {other.size}"
        if not np.allclose(self.spacing, other.spacing, rtol=tol, atol=0):
            return f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}"
        scale = max(1.0, float(np.max(np.abs(self.spacing))))
        if not np.allclose(self.origin, other.origin, rtol=0, atol=tol * scale * 10):
            return f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}"
        if not np.allclose(self.direction, other.direction, rtol=0, atol=tol * 10):
            return f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}"
        return None


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def strip_image_ending(name: str) -> str:
    for ending in IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_ENDINGS) and not path.name.startswith(".")


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a file SimpleITK understands, or a folder holding one DICOM series; one-line error otherwise.

    Every command reads images and labels through here, so this is where damaged inputs are refused:
    truncated or corrupt files, NaN/Inf voxels (any format; NIfTI is scanned raw because SimpleITK
    reads NaN as 0), zero or non-finite spacing, non-3D and vector images.
    """
    path = Path(path)
    if path.is_dir():
        image = _read_dicom_series(path)
    elif path.is_file():
        nifti = check_nifti_payload(path) if path.name.lower().endswith((".nii", ".nii.gz")) else False
        image = _sitk_read(path)
        if not nifti:
            _check_finite(image, path)
    elif path.is_symlink():
        raise HCError(f"{path}: broken symbolic link (its target does not exist or links back to itself)")
    elif path.exists():
        raise HCError(f"{path}: not a regular file or folder")
    else:
        raise HCError(f"{path}: no such file or folder")
    if image.GetDimension() != 3:
        raise HCError(f"{path}: expected a 3D image, got {image.GetDimension()}D of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise HCError(f"{path}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()} (vector/RGB image)")
    check_spacing(image.GetSpacing(), path)
    return image


_STDERR_LOCK = threading.Lock()


def _sitk_read(path: Path) -> sitk.Image:
    """``sitk.ReadImage`` with the C++ libraries' own stderr chatter captured (it becomes the reason).

    Why: MetaIO and NRRD print their complaints straight to file descriptor 2, so a failed read would
    show several lines and a misleading exception text ("No such file or directory") instead of one.
    """
    with _STDERR_LOCK, _captured_fd2() as captured:
        try:
            image = sitk.ReadImage(str(path))
            error = None
        except RuntimeError as exc:
            image, error = None, exc
    chatter = [line.strip() for line in captured() if line.strip()]
    if error is None:
        if chatter:
            sys.stderr.write("\n".join(chatter) + "\n")
        return image
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reasons = [line for line in lines if not any(k in line for k in ("Exception thrown", "ITK ERROR", "Reason: No such"))]
    if chatter:
        short = " ".join(" ".join(chatter[:2]).split())
    else:
        short = reasons[-1] if reasons else (lines[-1] if lines else "unreadable")
    raise HCError(f"{path}: cannot read image ({short[:160]})") from None


@contextlib.contextmanager
def _captured_fd2():
    """Redirect file descriptor 2 into a temporary file; yields a callable returning the captured lines."""
    text: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield lambda: text
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.extend(tmp.read(1 << 16).decode("utf-8", "replace").splitlines())


def check_nifti_payload(path: Path) -> bool:
    """Scan a NIfTI file's raw payload; raise for truncation, a damaged stream, NaN/Inf or zero pixdim.

    Returns True when the file was a NIfTI this scan understood (its values are then known finite).
    """
    try:
        facts = nifti_header.scan(path)
    except OSError as exc:
        raise HCError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if facts is None:
        return False
    if facts.stream_error:
        raise HCError(f"{path}: file is damaged or truncated: {facts.stream_error}")
    if facts.payload_bytes < facts.expected_bytes:
        raise HCError(f"{path}: file is truncated: the header declares {facts.expected_bytes} bytes of voxel data, "
                      f"{facts.payload_bytes} are present")
    spatial = facts.pixdim[:3]
    if any(not math.isfinite(v) or v == 0 for v in spatial):
        raise HCError(f"{path}: invalid voxel spacing (pixdim {_fmt(spatial)} mm): must be finite and non-zero")
    if facts.nonfinite:
        raise HCError(f"{path}: image contains {facts.nonfinite} NaN/Inf voxels")
    return True


def check_spacing(spacing: Sequence[float], path: str | os.PathLike) -> None:
    """Zero, negative or non-finite spacing would silently distort every resampling step."""
    if any(not math.isfinite(float(v)) or float(v) <= 0 for v in spacing):
        raise HCError(f"{path}: invalid voxel spacing {_fmt(spacing)} mm: must be finite and positive")


def _check_finite(image: sitk.Image, path: str | os.PathLike) -> None:
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    view = sitk.GetArrayViewFromImage(image)
    bad = view.size - int(np.count_nonzero(np.isfinite(view)))
    if bad:
        raise HCError(f"{path}: image contains {bad} NaN/Inf voxels")


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise HCError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise HCError(f"{folder}: folder holds {len(series)} DICOM series; put each series in its own folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise HCError(f"{folder}: cannot read DICOM series ({str(exc).strip().splitlines()[-1][:160]})") from None


def image_array(image: sitk.Image, path: str | os.PathLike = "image", dtype=np.float32) -> np.ndarray:
    """Voxel array in SimpleITK order (z, y, x); rejects NaN/Inf so they never reach a network."""
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise HCError(f"{path}: image contains {bad} NaN/Inf voxels")
    return array.astype(dtype, copy=False)


def label_array(image: sitk.Image, path: str | os.PathLike = "label") -> np.ndarray:
    """Integer label array (z, y, x). Float labels are accepted when every value is integral."""
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise HCError(f"{path}: label map contains NaN/Inf values")
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            bad = np.unique(array[rounded != array])[:5]
            raise HCError(f"{path}: label map has non-integral values, e.g. {', '.join(f'{v:g}' for v in bad)}")
        array = rounded
    if array.min(initial=0) < 0 or array.max(initial=0) > np.iinfo(np.int32).max:
        raise HCError(f"{path}: label values out of range ({array.min()}..{array.max()})")
    return array.astype(np.int32, copy=False)


def write_array(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True,
                reference: str | os.PathLike | None = None) -> None:
    """Write an array in SimpleITK order with exactly ``geometry``; atomic.

    When ``reference`` is the NIfTI file the geometry was read from and ``path`` is NIfTI too, the
    reference's header is reused (see :mod:`heartcascade.dataset.nifti_header`): SimpleITK's own NIfTI
    writer re-derives the quaternion and can move an oblique direction by ~1e-8, while a copied header
    reads back bit for bit.
    """
    if reference is not None and nifti_header.can_copy_header(reference, path, geometry):
        with atomic_path(path) as tmp:
            nifti_header.write_with_header(np.ascontiguousarray(array), reference, tmp, compress)
        return
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to(image)
    write_image(image, path, compress=compress)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            raise HCError(f"{path}: cannot write image ({str(exc).strip().splitlines()[-1][:160]})") from None


# ---------------------------------------------------------------------------------------------------
# Slice axis and the canonical axis order (slice axis first)
# ---------------------------------------------------------------------------------------------------

def working_spacing(spacing: Sequence[float]) -> tuple[float, ...]:
    """The spacing every computation uses: the header's values rounded to float32.

    Why: the same scan carries 1.25 in a NIfTI header (stored as float32) and 1.2499999999999998 in an
    NRRD or MHA header (text, written from a double), and ``ceil(10 mm / spacing)`` is 8 voxels for one
    and 9 for the other. Rounding to float32, NIfTI's own precision, makes every format give the same
    crops, grids and predictions. Written outputs keep the header's exact geometry.
    """
    return tuple(float(np.float32(s)) for s in spacing)


def choose_slice_axis(spacing: Sequence[float], direction: Sequence[float]) -> int:
    """Index axis (0=x, 1=y, 2=z in SimpleITK order) along which the case is processed slice by slice.

    With anisotropic spacing it is the thick-slice axis (the acquisition's slice direction). Otherwise
    it is the index axis whose direction is closest to the patient's superior-inferior axis, i.e. the
    axial slices of a CT.
    """
    spacing = np.asarray(spacing, dtype=float)
    order = np.argsort(spacing)[::-1]
    if spacing[order[0]] >= ANISOTROPY_RATIO * spacing[order[1]]:
        return int(order[0])
    dmat = np.asarray(direction, dtype=float).reshape(3, 3)
    # Column i is the physical direction of index axis i; physical row 2 is the S-I (LPS z) coordinate.
    return int(np.argmax(np.abs(dmat[2, :])))


def canonical_axes(slice_axis: int) -> tuple[int, int, int]:
    """numpy axes of a SimpleITK array (z, y, x) in canonical order: slice axis first."""
    np_axis = 2 - int(slice_axis)
    return (np_axis,) + tuple(a for a in (0, 1, 2) if a != np_axis)


def to_canonical(array: np.ndarray, slice_axis: int) -> np.ndarray:
    """SimpleITK-order array (..., z, y, x) → canonical (..., D, H, W); leading axes (channels) kept."""
    lead = array.ndim - 3
    axes = tuple(range(lead)) + tuple(lead + a for a in canonical_axes(slice_axis))
    return np.transpose(array, axes)


def from_canonical(array: np.ndarray, slice_axis: int) -> np.ndarray:
    """Inverse of :func:`to_canonical`."""
    lead = array.ndim - 3
    axes = tuple(lead + a for a in canonical_axes(slice_axis))
    inverse = np.argsort(axes) + lead
    return np.transpose(array, tuple(range(lead)) + tuple(int(a) for a in inverse))


def canonical_spacing(spacing_xyz: Sequence[float], slice_axis: int) -> tuple[float, float, float]:
    """Spacing in canonical (D, H, W) order."""
    return tuple(float(spacing_xyz[2 - a]) for a in canonical_axes(slice_axis))


def canonical_shape(size_xyz: Sequence[int], slice_axis: int) -> tuple[int, int, int]:
    return tuple(int(size_xyz[2 - a]) for a in canonical_axes(slice_axis))
