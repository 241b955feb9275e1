"""Image appearance of a tissue-class map: contrast-enhanced CT in HU, or bSSFP-like cine MR.

Why separate from the anatomy: the same class map (parametric or from a real label map) can be
rendered as either modality, and tests can check intensity statistics per class.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from heartcascade.dataset.synthetic import anatomy as A

CT_MIN, CT_MAX = -1024, 3071


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def ct_means(rng: np.random.Generator) -> np.ndarray:
    """Mean HU per class for one contrast-enhanced cardiac CT (arterial phase)."""
    lut = np.zeros(A.N_CLASSES, np.float32)
    blood = _u(rng, 300, 400)
    right = blood * _u(rng, 0.8, 1.05)  # right heart: less or mixed contrast
    myo = _u(rng, 90, 130)
    lut[A.AIR] = -1000
    lut[[A.LV, A.LA, A.AA, A.BLOOD]] = blood
    lut[A.LA] = blood * _u(rng, 0.95, 1.02)
    lut[[A.RV, A.RA, A.PA, A.BLOOD_RIGHT]] = right
    lut[[A.MYO, A.WALL]] = myo
    lut[A.WALL] = myo * _u(rng, 0.8, 1.0)
    lut[[A.FAT, A.EPIFAT]] = _u(rng, -110, -80)
    lut[A.EPIFAT] = lut[A.FAT] + _u(rng, 0, 20)
    lut[A.MUSCLE] = _u(rng, 40, 60)
    lut[A.LUNG] = _u(rng, -860, -780)
    lut[A.BONE] = _u(rng, 900, 1250)
    lut[A.MARROW] = _u(rng, 700, 850)
    lut[A.CSF] = _u(rng, 5, 20)
    lut[A.DISC] = _u(rng, 70, 100)
    lut[A.LIVER] = _u(rng, 70, 110)
    lut[A.SOFT] = _u(rng, -60, 10)
    return lut


def mr_means(rng: np.random.Generator) -> np.ndarray:
    """Relative bSSFP signal per class: bright blood and fat, dark myocardium, black lung/cortex."""
    lut = np.zeros(A.N_CLASSES, np.float32)
    blood = _u(rng, 0.9, 1.0)
    lut[[A.LV, A.LA, A.AA, A.BLOOD]] = blood
    lut[[A.RV, A.RA, A.PA, A.BLOOD_RIGHT]] = blood * _u(rng, 0.9, 1.02)
    lut[[A.MYO, A.WALL]] = _u(rng, 0.18, 0.28)
    lut[[A.FAT, A.EPIFAT]] = _u(rng, 0.7, 0.9)
    lut[A.MUSCLE] = _u(rng, 0.2, 0.3)
    lut[A.LUNG] = _u(rng, 0.02, 0.06)
    lut[A.BONE] = _u(rng, 0.03, 0.08)
    lut[A.MARROW] = _u(rng, 0.5, 0.7)
    lut[A.CSF] = _u(rng, 0.8, 1.0)
    lut[A.DISC] = _u(rng, 0.35, 0.5)
    lut[A.LIVER] = _u(rng, 0.3, 0.4)
    lut[A.SOFT] = _u(rng, 0.4, 0.6)
    return lut


def _upsample_axis(field: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation of ``field`` along ``axis`` to ``n_out`` samples spanning the same extent.

    Element-wise (no BLAS), so the result is bit-identical on any machine and thread count.
    """
    n_in = field.shape[axis]
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.clip(np.floor(pos).astype(np.intp), 0, n_in - 2)
    shape = [1] * field.ndim
    shape[axis] = n_out
    frac = (pos - lo).astype(np.float32).reshape(shape)
    a = np.take(field, lo, axis=axis)
    b = np.take(field, lo + 1, axis=axis)
    return a + (b - a) * frac


class SmoothField:
    """Zero-mean random field, smooth over ``correlation_mm``: random knots, separable linear upsampling.

    Held as knots upsampled in-plane only; :meth:`slab` finishes the z interpolation for a few slices,
    so a full-size volume never needs an extra full-size float array.
    """

    def __init__(self, shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float], rng: np.random.Generator,
                 correlation_mm: float) -> None:
        coarse = [max(2, int(np.ceil(n * s / correlation_mm)) + 1) for n, s in zip(shape, spacing_zyx)]
        knots = rng.standard_normal(coarse).astype(np.float32)
        self.plane = _upsample_axis(_upsample_axis(knots, shape[2], 2), shape[1], 1)  # (cz, ny, nx)
        self.diff = self.plane[1:] - self.plane[:-1]
        self.pos = np.linspace(0, coarse[0] - 1, shape[0])
        self.lo = np.clip(np.floor(self.pos).astype(np.intp), 0, coarse[0] - 2)

    def slab(self, z0: int, z1: int) -> np.ndarray:
        lo = self.lo[z0:z1]
        frac = (self.pos[z0:z1] - lo).astype(np.float32)[:, None, None]
        return self.plane[lo] + self.diff[lo] * frac


def smooth_field(shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float], rng: np.random.Generator,
                 correlation_mm: float) -> np.ndarray:
    """The whole :class:`SmoothField` as one array."""
    return SmoothField(shape, spacing_zyx, rng, correlation_mm).slab(0, shape[0])


def _slabs(shape: tuple[int, ...], voxels: int = 1 << 22):
    step = max(1, voxels // max(1, int(np.prod(shape[1:]))))
    for z0 in range(0, shape[0], step):
        yield z0, min(z0 + step, shape[0])


def _blur(image: np.ndarray, sigma_vox: tuple[float, float, float]) -> np.ndarray:
    return ndimage.gaussian_filter(image, sigma=sigma_vox, truncate=3.0, output=np.float32)


def render_ct(classes: np.ndarray, spacing_zyx: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """int16 HU image: class means + smooth texture, Gaussian PSF blur, Gaussian quantum noise."""
    lut = ct_means(rng)
    texture = np.zeros(A.N_CLASSES, np.float32)
    texture[A.LUNG] = 60.0
    texture[[A.LV, A.LA, A.AA, A.RV, A.RA, A.PA, A.BLOOD, A.BLOOD_RIGHT]] = 20.0
    texture[[A.LIVER, A.MUSCLE, A.MYO, A.FAT, A.SOFT]] = 10.0
    field = SmoothField(classes.shape, spacing_zyx, rng, correlation_mm=_u(rng, 12, 25))
    image = np.empty(classes.shape, np.float32)
    for z0, z1 in _slabs(classes.shape):
        c = classes[z0:z1]
        image[z0:z1] = lut[c] + texture[c] * field.slab(z0, z1)
    del field
    # PSF of ~0.6-0.9 mm, at least ~0.5 voxel
    psf_mm = _u(rng, 0.6, 0.9)
    image = _blur(image, tuple(max(0.5, psf_mm / s) for s in spacing_zyx))
    # quantum noise falls with voxel volume; keep some noise on coarse grids too
    voxel_mm3 = float(np.prod(spacing_zyx))
    sigma = np.float32(max(_u(rng, 8, 14), _u(rng, 25, 40) * float(np.sqrt(0.15 / voxel_mm3))))
    out = np.empty(classes.shape, np.int16)
    for z0, z1 in _slabs(classes.shape):
        slab = image[z0:z1]
        slab += rng.standard_normal(slab.shape, dtype=np.float32) * sigma
        np.rint(slab, out=slab)
        np.clip(slab, CT_MIN, CT_MAX, out=slab)
        out[z0:z1] = slab
    return out


def render_mr(classes: np.ndarray, spacing_zyx: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """int16 bSSFP-like image: class signal, slice-profile blur, smooth coil bias, Rician noise."""
    lut = mr_means(rng) * np.float32(_u(rng, 500, 1500))
    field = SmoothField(classes.shape, spacing_zyx, rng, correlation_mm=_u(rng, 15, 30))
    image = np.empty(classes.shape, np.float32)
    for z0, z1 in _slabs(classes.shape):
        image[z0:z1] = lut[classes[z0:z1]] * (np.float32(1.0) + np.float32(0.06) * field.slab(z0, z1))
    del field
    sigma_vox = tuple(max(0.4, 0.8 / s) for s in spacing_zyx[1:])
    image = _blur(image, (0.35,) + sigma_vox)
    bias = BiasField(classes.shape, rng)
    sigma = np.float32(lut[A.LV] * _u(rng, 0.02, 0.05))
    out = np.empty(classes.shape, np.int16)
    for z0, z1 in _slabs(classes.shape):
        slab = image[z0:z1]
        slab *= bias.slab(z0, z1)
        slab += rng.standard_normal(slab.shape, dtype=np.float32) * sigma
        imag = rng.standard_normal(slab.shape, dtype=np.float32) * sigma
        slab = np.sqrt(slab * slab + imag * imag)      # Rician magnitude
        np.rint(slab, out=slab)
        np.clip(slab, 0, 32767, out=slab)
        out[z0:z1] = slab
    return out


class BiasField:
    """Smooth multiplicative coil sensitivity: exp of a random quadratic, about ±25-40% over the FOV."""

    def __init__(self, shape: tuple[int, int, int], rng: np.random.Generator) -> None:
        self.axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
        self.c = rng.uniform(-0.15, 0.15, 9).astype(np.float32)

    def slab(self, z0: int, z1: int) -> np.ndarray:
        c = self.c
        z = self.axes[0][z0:z1, None, None]
        y = self.axes[1][None, :, None]
        x = self.axes[2][None, None, :]
        log_b = (c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * y * y + c[5] * z * z
                 + c[6] * x * y + c[7] * y * z + c[8] * x * z)
        return np.exp(log_b).astype(np.float32)
