"""Parametric thorax and heart as painted implicit shapes, rendered to a tissue-class map on any grid.

Why painting: every structure is a cheap implicit shape (ellipsoid, capsule, cylinder) in its own
local frame; shapes are painted in anatomical priority order, with an optional set of classes they
may replace. This gives touching, non-overlapping structures (e.g. the RV crescent is the RV
ellipsoid minus the later-painted LV myocardium) without any mesh or distance-transform work.

Speed: a shape is evaluated only on the index box its bounds cover, on coordinate arrays that
broadcast (an axis-aligned grid gives 1D coordinate vectors), so a full-size CT (~50M voxels)
renders in seconds.

Physical coordinates are LPS millimetres (x → patient left, y → posterior, z → superior), the
convention of SimpleITK/DICOM. Class values 1..7 are the MM-WHS training labels; the others are
unlabelled tissues that only shape the image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from heartcascade.dataset.image_io import Geometry

# Tissue classes. 1..7 are exactly the training labels (MMWHS_LABELS).
AIR, LV, MYO, RV, LA, RA, AA, PA = 0, 1, 2, 3, 4, 5, 6, 7
FAT, MUSCLE, LUNG, BONE, MARROW, CSF, DISC, BLOOD, BLOOD_RIGHT, WALL, EPIFAT, LIVER, SOFT = range(8, 21)
N_CLASSES = 21
HEART_CLASSES = (LV, MYO, RV, LA, RA, AA, PA)
CLASS_NAMES = ("air", "LV", "Myo", "RV", "LA", "RA", "AA", "PA", "fat", "muscle", "lung", "bone", "marrow",
               "csf", "disc", "blood", "blood_right", "wall", "epifat", "liver", "soft")


def labels_from_classes(classes: np.ndarray) -> np.ndarray:
    """Training label map (0..7) of a class map: unlabelled tissues become background."""
    return np.where(classes <= PA, classes, 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Grids and frames
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """A voxel grid: numpy shape (z, y, x) and SimpleITK geometry (x, y, z order)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_geometry(cls, geometry: Geometry) -> "Grid":
        return cls(tuple(int(v) for v in geometry.size[::-1]), tuple(geometry.spacing), tuple(geometry.origin),
                   tuple(geometry.direction))

    def geometry(self) -> Geometry:
        return Geometry(tuple(int(v) for v in self.shape[::-1]), tuple(float(v) for v in self.spacing),
                        tuple(float(v) for v in self.origin), tuple(float(v) for v in self.direction))

    @property
    def matrix(self) -> np.ndarray:
        """3x3 map from index (x, y, z) offsets to physical offsets."""
        return np.asarray(self.direction, float).reshape(3, 3) * np.asarray(self.spacing, float)[None, :]

    def physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """Physical points (N, 3) of continuous indices (N, 3) in x, y, z order."""
        return np.asarray(self.origin, float) + np.asarray(index_xyz, float) @ self.matrix.T

    def index_box(self, points: np.ndarray, margin: float = 1.0) -> tuple[slice, slice, slice] | None:
        """numpy slices (z, y, x) of the index box holding physical ``points`` (N, 3); None if outside."""
        points = np.clip(np.asarray(points, float), -1e7, 1e7)
        idx = np.linalg.solve(self.matrix, (points - np.asarray(self.origin, float)).T).T
        lo = np.floor(idx.min(axis=0) - margin).astype(np.int64)
        hi = np.ceil(idx.max(axis=0) + margin).astype(np.int64) + 1
        size = np.asarray(self.shape[::-1])
        lo = np.clip(lo, 0, size)
        hi = np.clip(hi, 0, size)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(lo[a]), int(hi[a])) for a in (2, 1, 0))

    def coords(self, box: tuple[slice, slice, slice] | None = None) -> list[np.ndarray]:
        """Physical X, Y, Z (float32) of the voxels in ``box``, as arrays that broadcast to the box."""
        box = box or tuple(slice(0, n) for n in self.shape)
        m = self.matrix
        # index axis a (x=0, y=1, z=2) is numpy axis 2 - a
        idx = []
        for a in range(3):
            sl = box[2 - a]
            shape = [1, 1, 1]
            shape[2 - a] = sl.stop - sl.start
            idx.append(np.arange(sl.start, sl.stop, dtype=np.float64).reshape(shape))
        out = []
        for i in range(3):
            total: np.ndarray | float = np.float32(self.origin[i])
            for a in range(3):
                if m[i, a] != 0.0:
                    total = total + (m[i, a] * idx[a]).astype(np.float32)
            out.append(np.asarray(total, dtype=np.float32))
        return out


def rotation_xyz(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix from angles (degrees) about x, then y, then z."""
    ax, ay, az = np.radians(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def basis_z(direction: Sequence[float], up_hint: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Rotation whose third column is ``direction`` (normalised): a local frame with z along it."""
    d = np.asarray(direction, float)
    d = d / np.linalg.norm(d)
    hint = np.asarray(up_hint, float)
    if abs(float(np.dot(hint, d))) > 0.9:
        hint = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(hint, d)
    u /= np.linalg.norm(u)
    v = np.cross(d, u)
    return np.stack([u, v, d], axis=1)


@dataclass(frozen=True)
class Wave:
    """Smooth deformation: physical coordinate ``axis`` shifts by amp*sin(k*coord[source] + phase)."""

    axis: int
    source: int
    amp: float
    k: float
    phase: float


@dataclass(frozen=True)
class Frame:
    """Local coordinates q = R^T (P' - c) / scale, where P' is the (wave-deformed) physical point."""

    center: tuple[float, float, float]
    rotation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    scale: float = 1.0
    waves: tuple[Wave, ...] = ()

    @property
    def R(self) -> np.ndarray:
        return np.asarray(self.rotation, float).reshape(3, 3)

    def child(self, center: Sequence[float], rotation: np.ndarray | None = None) -> "Frame":
        """A frame placed at local ``center`` with local ``rotation`` inside this one."""
        R = self.R
        c = np.asarray(self.center, float) + self.scale * R @ np.asarray(center, float)
        rot = R if rotation is None else R @ np.asarray(rotation, float)
        return Frame(tuple(c), tuple(rot.ravel()), self.scale, self.waves)

    def to_physical(self, q: np.ndarray) -> np.ndarray:
        """Physical points of local points (N, 3), ignoring the small wave deformation."""
        return np.asarray(self.center, float) + self.scale * np.asarray(q, float) @ self.R.T

    @property
    def wave_margin(self) -> float:
        return float(sum(abs(w.amp) for w in self.waves))

    def to_local(self, xyz: list[np.ndarray]) -> list[np.ndarray]:
        p = list(xyz)
        for w in self.waves:  # sources read the undeformed coordinates so the order does not matter
            p[w.axis] = p[w.axis] + np.float32(w.amp) * np.sin(np.float32(w.k) * xyz[w.source] + np.float32(w.phase))
        d = [p[i] - np.float32(self.center[i]) for i in range(3)]
        R = self.R / self.scale
        out = []
        for k in range(3):
            total: np.ndarray | float = 0.0
            for i in range(3):
                if abs(R[i, k]) > 1e-12:
                    total = total + np.float32(R[i, k]) * d[i]
            out.append(np.asarray(total, dtype=np.float32))
        return out


# ---------------------------------------------------------------------------------------------------
# Shapes (axis-aligned in their local frame, centred at the origin unless said otherwise)
# ---------------------------------------------------------------------------------------------------

INF = float("inf")


def _within_z(m: np.ndarray, z: np.ndarray, zmin: float, zmax: float) -> np.ndarray:
    """``m`` restricted to the slab ``zmin <= z <= zmax`` (an infinite bound adds no test)."""
    if zmin > -INF:
        m = m & (z >= zmin)
    if zmax < INF:
        m = m & (z <= zmax)
    return m


class Shape:
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def inside(self, q: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class Ellipsoid(Shape):
    radii: tuple[float, float, float]
    zmin: float = -INF
    zmax: float = INF

    def bounds(self):
        r = np.asarray(self.radii, float)
        lo, hi = -r.copy(), r.copy()
        lo[2], hi[2] = max(lo[2], self.zmin), min(hi[2], self.zmax)
        return lo, hi

    def inside(self, q):
        a, b, c = (np.float32(1.0 / r ** 2) for r in self.radii)
        m = q[0] * q[0] * a + q[1] * q[1] * b <= np.float32(1.0) - q[2] * q[2] * c
        return _within_z(m, q[2], self.zmin, self.zmax)


@dataclass(frozen=True)
class Cylinder(Shape):
    """(Super)elliptic cylinder along local z: (|x|/rx)^p + (|y|/ry)^p <= 1, zmin <= z <= zmax."""

    rx: float
    ry: float
    zmin: float = -INF
    zmax: float = INF
    power: float = 2.0

    def bounds(self):
        return np.array([-self.rx, -self.ry, self.zmin]), np.array([self.rx, self.ry, self.zmax])

    def inside(self, q):
        if self.power == 2.0:
            m = q[0] * q[0] * np.float32(1 / self.rx ** 2) + q[1] * q[1] * np.float32(1 / self.ry ** 2) <= 1.0
        else:
            p = np.float32(self.power)
            m = np.abs(q[0] * np.float32(1 / self.rx)) ** p + np.abs(q[1] * np.float32(1 / self.ry)) ** p <= 1.0
        return _within_z(m, q[2], self.zmin, self.zmax)


@dataclass(frozen=True)
class Capsule(Shape):
    """Tube along local z from 0 to ``length`` with radius r0 → r1; ends rounded (cap) or cut flat."""

    length: float
    r0: float
    r1: float
    cap0: bool = True
    cap1: bool = True

    def bounds(self):
        r = max(self.r0, self.r1)
        return (np.array([-r, -r, -self.r0 if self.cap0 else 0.0]),
                np.array([r, r, self.length + (self.r1 if self.cap1 else 0.0)]))

    def inside(self, q):
        t = np.clip(q[2], 0.0, self.length)
        r = np.float32(self.r0) + np.float32((self.r1 - self.r0) / max(self.length, 1e-6)) * t
        dz = q[2] - t
        m = q[0] * q[0] + q[1] * q[1] + dz * dz <= r * r
        if not self.cap0:
            m = m & (q[2] >= 0.0)
        if not self.cap1:
            m = m & (q[2] <= self.length)
        return m


@dataclass(frozen=True)
class Box(Shape):
    half: tuple[float, float, float]

    def bounds(self):
        h = np.asarray(self.half, float)
        return -h, h.copy()

    def inside(self, q):
        return (np.abs(q[0]) <= self.half[0]) & (np.abs(q[1]) <= self.half[1]) & (np.abs(q[2]) <= self.half[2])


@dataclass(frozen=True)
class ZBands(Shape):
    """``shape`` restricted to periodic bands along local z (tilted by ``slope`` per mm of local y)."""

    shape: Shape
    period: float
    duty: float
    slope: float = 0.0
    phase: float = 0.0

    def bounds(self):
        return self.shape.bounds()

    def inside(self, q):
        m = self.shape.inside(q)
        zcol = q[2].ndim == 3 and q[2].shape[1:] == (1, 1)
        if m.ndim == 3 and m.shape[0] == 1 and zcol:
            # z-invariant shape (a cylinder shell): evaluate the bands only in its footprint
            iy, ix = np.nonzero(m[0])
            qy = np.broadcast_to(q[1], (1,) + m.shape[1:])[0, iy, ix]
            u = (q[2][:, 0, 0][:, None] + np.float32(self.slope) * qy[None, :]) * np.float32(1.0 / self.period) + np.float32(self.phase)
            out = np.zeros((q[2].shape[0],) + m.shape[1:], dtype=bool)
            out[:, iy, ix] = (u - np.floor(u)) < self.duty
            return out
        u = (q[2] + np.float32(self.slope) * q[1]) * np.float32(1.0 / self.period) + np.float32(self.phase)
        return m & ((u - np.floor(u)) < self.duty)


@dataclass(frozen=True)
class Minus(Shape):
    """``a`` without ``b`` (both in the same local frame)."""

    a: Shape
    b: Shape

    def bounds(self):
        return self.a.bounds()

    def inside(self, q):
        return self.a.inside(q) & ~self.b.inside(q)


# ---------------------------------------------------------------------------------------------------
# Painting
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Paint:
    """Paint class ``cls`` where ``shape`` (in ``frame``) is, replacing only classes in ``over`` if given."""

    cls: int
    shape: Shape
    frame: Frame
    over: frozenset[int] | None = None


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    lo = np.clip(lo, -1e6, 1e6)
    hi = np.clip(hi, -1e6, 1e6)
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


CHUNK_VOXELS = 1 << 21  # evaluate big boxes in z-slabs: small temporaries stay in cache, peak memory stays low


def paint(grid: Grid, classes: np.ndarray, op: Paint) -> None:
    lo, hi = op.shape.bounds()
    corners = op.frame.to_physical(_corners(lo, hi))
    margin = op.frame.wave_margin
    corners = np.concatenate([corners - margin, corners + margin])
    box = grid.index_box(corners)
    if box is None:
        return
    allowed = None
    if op.over is not None:
        allowed = np.zeros(256, dtype=bool)
        allowed[list(op.over)] = True
    plane = (box[1].stop - box[1].start) * (box[2].stop - box[2].start)
    step = max(1, CHUNK_VOXELS // max(plane, 1))
    for z0 in range(box[0].start, box[0].stop, step):
        slab = (slice(z0, min(z0 + step, box[0].stop)), box[1], box[2])
        mask = op.shape.inside(op.frame.to_local(grid.coords(slab)))
        sub = classes[slab]
        if mask.shape != sub.shape:
            mask = np.broadcast_to(mask, sub.shape)
        if allowed is not None:
            mask = mask & allowed[sub]
        np.copyto(sub, np.uint8(op.cls), where=mask)


def render(grid: Grid, ops: Sequence[Paint], classes: np.ndarray | None = None) -> np.ndarray:
    """Class map (uint8, numpy z, y, x) of the paint operations, in order."""
    if classes is None:
        classes = np.zeros(grid.shape, dtype=np.uint8)
    for op in ops:
        paint(grid, classes, op)
    return classes


def remove_specks(classes: np.ndarray, values: Sequence[int] = HEART_CLASSES) -> None:
    """Keep only the largest connected part of each structure, in place.

    Painting thin shapes on a coarse grid can leave one-voxel slivers (e.g. RV between myocardium
    and wall); each fragment takes the most common class around it, so every label is one piece.
    """
    heart = (classes > 0) & (classes <= max(values))
    if not heart.any():
        return
    box = tuple(slice(int(ix.min()), int(ix.max()) + 1)
                for ix in (np.nonzero(heart.any(axis=(1, 2)))[0], np.nonzero(heart.any(axis=(0, 2)))[0],
                           np.nonzero(heart.any(axis=(0, 1)))[0]))
    crop = classes[box]
    for value in values:
        parts, n = ndimage.label(crop == value)
        if n <= 1:
            continue
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        keep = int(sizes.argmax())
        for i, sl in enumerate(ndimage.find_objects(parts), start=1):
            if i == keep or sl is None:
                continue
            grown = tuple(slice(max(0, a.start - 1), min(dim, a.stop + 1)) for a, dim in zip(sl, crop.shape))
            sub = crop[grown]
            mask = parts[grown] == i
            around = sub[ndimage.binary_dilation(mask) & ~mask]
            around = around[around != value]
            sub[mask] = np.bincount(around).argmax() if around.size else WALL


def tube(points: Sequence[Sequence[float]], radii: Sequence[float], cls: int, frame: Frame,
         over: frozenset[int] | None = None, flat_start: bool = False, flat_end: bool = False) -> list[Paint]:
    """A polyline tube (chain of capsules) through local ``points`` with per-point radii.

    ``flat_start``/``flat_end`` cut the first/last end perpendicular to its segment, so that a tube
    can meet a valve plane or another flat-ended tube exactly.
    """
    ops = []
    pts = np.asarray(points, float)
    last = len(pts) - 2
    for a in range(len(pts) - 1):
        d = pts[a + 1] - pts[a]
        length = float(np.linalg.norm(d))
        if length < 1e-6:
            continue
        shape = Capsule(length, float(radii[a]), float(radii[a + 1]), cap0=not (flat_start and a == 0),
                        cap1=not (flat_end and a == last))
        ops.append(Paint(cls, shape, frame.child(pts[a], basis_z(d)), over))
    return ops


# ---------------------------------------------------------------------------------------------------
# Anatomy: the heart
# ---------------------------------------------------------------------------------------------------

def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


NOT_HEART = frozenset(range(N_CLASSES)) - frozenset(HEART_CLASSES)


@dataclass
class HeartModel:
    """Paint operations of a sampled heart, and its hila: local points where lung vessels start."""

    ops: list[Paint]
    hila: dict[str, np.ndarray] = field(default_factory=dict)


def heart_ops(rng: np.random.Generator, frame: Frame) -> HeartModel:
    """Sample a heart in ``frame`` (local mm at unit scale; x left, y posterior, z superior).

    Layout follows the real heart: a bullet-shaped LV whose long axis points to the
    left-anterior-inferior apex, wrapped by myocardium that also caps its base except for the
    mitral and aortic openings; the RV is a crescent against the septum on the right-anterior side;
    the atria sit superior-posterior on the base; the aorta leaves the LV and rises, arches and
    descends beside the spine; the pulmonary trunk leaves the RV outflow tract anterior-left of the
    aorta and splits under the arch, its right branch passing behind the ascending aorta.
    """
    def f(lo: float = 0.9, hi: float = 1.1) -> float:
        return float(rng.uniform(lo, hi))

    def jit(s: float = 2.0) -> np.ndarray:
        return rng.normal(0.0, s, 3)

    a = _unit(np.array([0.55, -0.45, -0.70]) + rng.normal(0, 0.06, 3))      # base → apex
    v = np.array([-0.7, -0.7, 0.1])                                              # toward right-anterior
    v = _unit(v - np.dot(v, a) * a)
    w = np.cross(a, v)
    vent_rot = np.stack([v, w, a], axis=1)   # ventricular frame: x = v, y = w, z = a

    p_mv = np.array([5.0, 12.0, 8.0]) + jit(1.5)  # centre of the LV base plane
    r_cav = 21.0 * f(0.88, 1.12)
    l_cav = 68.0 * f(0.9, 1.1)
    t_myo = 10.0 * f(0.85, 1.15)
    t_base = t_myo
    r_mo = 7.5 * f()                         # mitral and aortic openings side by side in the base
    r_ao = 7.0 * f()
    p_m = p_mv - v * (r_mo + 0.5)
    p_a = p_mv + v * (r_ao + 1.5)
    lv_frame = frame.child(p_mv, vent_rot)

    c_rv = p_mv + v * 24.0 * f(0.95, 1.05) + a * 30.0 * f(0.95, 1.05)
    rv_radii = (26.0 * f(), 40.0 * f(), 34.0 * f(0.95, 1.1))
    t_rv = 3.5 * f(0.85, 1.15)
    la_radii = (27.0 * f(), 17.0 * f(), 19.0 * f())
    c_la = p_m - a * (t_base + 17.0) - v * 6.0 + jit(1.0)
    ra_radii = (20.0 * f(), 20.0 * f(), 24.0 * f())
    c_ra = p_mv + np.array([-44.0, -2.0, 4.0]) + jit(1.5)
    t_atr = 2.5
    aa0 = p_a - a * t_base                   # aortic valve plane = top of the myocardial base
    r_aa = 13.5 * f()
    p_pv = aa0 + np.array([20.0, -20.0, 18.0]) + jit(1.0)
    r_pa = 12.0 * f()

    ops: list[Paint] = []
    walls_ok = NOT_HEART  # unlabelled tissue, incl. chamber walls
    vessel_ok = walls_ok - {BONE, MARROW, DISC, CSF}  # unlabelled vessels never cut through the spine
    soft_only = frozenset({SOFT, LUNG, MUSCLE, FAT})

    # pericardial fat envelope around the ventricles and around the atria/great-vessel roots
    env_v = lv_frame.child((8.0, 0.0, l_cav / 2 + 2.0))
    ops.append(Paint(EPIFAT, Ellipsoid((r_cav + t_myo + 18.0, 52.0, l_cav / 2 + 18.0)), env_v, soft_only))
    env_a = frame.child((c_la + c_ra) / 2 + np.array([2.0, -8.0, 8.0]))
    ops.append(Paint(EPIFAT, Ellipsoid((62.0, 44.0, 44.0)), env_a, soft_only))

    # atria with thin unlabelled walls, pulmonary veins into the LA, caval veins into the RA
    la_frame = frame.child(c_la, rotation_xyz(rng.uniform(-8, 8, 3)))
    ra_frame = frame.child(c_ra, rotation_xyz(rng.uniform(-8, 8, 3)))
    ops.append(Paint(WALL, Ellipsoid(tuple(r + t_atr for r in la_radii)), la_frame))
    ops.append(Paint(WALL, Ellipsoid(tuple(r + t_atr for r in ra_radii)), ra_frame))
    hila: dict[str, np.ndarray] = {}
    r_pv = 6.0 * f()
    for side in (1, -1):
        for zs, name in ((1, "sup"), (-1, "inf")):
            start = c_la + np.array([side * 16.0, 4.0, zs * 7.0])
            mid = c_la + np.array([side * (la_radii[0] + 12.0), 8.0, zs * 11.0]) + jit(1.5)
            end = c_la + np.array([side * (la_radii[0] + 32.0), 14.0, zs * 18.0]) + jit(3.0)
            ops += tube([mid, end], [r_pv, r_pv * 0.9], BLOOD, frame, vessel_ok)
            ops += tube([start, mid], [r_pv, r_pv], LA, frame, walls_ok | {LA})
            hila[f"pv_{'l' if side > 0 else 'r'}{name}"] = end
    ops.append(Paint(LA, Ellipsoid(la_radii), la_frame))
    # the LA funnels down onto the mitral opening in the myocardial base
    ops += tube([p_m - a * t_base, p_m - a * (t_base + 6.0), c_la], [r_mo + 1.5, r_mo + 3.0, r_mo + 6.0], LA, frame,
                walls_ok, flat_start=True)
    r_cava = 9.0 * f()
    svc = [c_ra + np.array([2.0, 0.0, 14.0]), c_ra + np.array([2.0, 2.0, ra_radii[2] + 10.0]), c_ra + np.array([4.0, 6.0, 140.0])]
    ivc = [c_ra + np.array([0.0, 6.0, -14.0]), c_ra + np.array([2.0, 8.0, -ra_radii[2] - 8.0]), c_ra + np.array([6.0, 12.0, -170.0])]
    ops += tube(svc[1:], [r_cava, r_cava], BLOOD_RIGHT, frame, vessel_ok)
    ops += tube(ivc[1:], [r_cava * 1.2, r_cava * 1.2], BLOOD_RIGHT, frame, vessel_ok)
    ops += tube(svc[:2], [r_cava, r_cava], RA, frame, walls_ok | {RA})
    ops += tube(ivc[:2], [r_cava * 1.2, r_cava * 1.2], RA, frame, walls_ok | {RA})
    ops.append(Paint(RA, Ellipsoid(ra_radii), ra_frame))

    # right ventricle (free wall unlabelled) and its outflow tract (infundibulum) up to the
    # pulmonary valve; the LV myocardium painted next carves the septal side → crescent
    rv_frame = frame.child(c_rv, vent_rot)
    ops.append(Paint(WALL, Ellipsoid(tuple(r + t_rv for r in rv_radii)), rv_frame))
    ops.append(Paint(RV, Ellipsoid(rv_radii), rv_frame))
    rvot = [c_rv - a * (rv_radii[2] * 0.4), p_pv]
    ops += tube(rvot, [r_pa * 1.1 + t_rv, r_pa + t_rv], WALL, frame, walls_ok, flat_end=True)
    ops += tube(rvot, [r_pa * 1.1, r_pa], RV, frame, walls_ok | {RV, RA}, flat_end=True)

    # LV myocardium: half-ellipsoid shell from the base plate (thickness t_base) to the apex
    ops.append(Paint(MYO, Ellipsoid((r_cav + t_myo, r_cav + t_myo, l_cav + 0.8 * t_myo), zmin=-t_base), lv_frame))

    # ascending aorta on the aortic opening, arch, descending aorta beside the spine
    aa1 = aa0 - a * 10.0
    aa2 = aa1 + np.array([-4.0, -2.0, 24.0]) + jit(1.5)
    aa3 = aa2 + np.array([0.0, 4.0, 24.0]) + jit(1.5)
    arch = [aa3, aa3 + np.array([6.0, 16.0, 18.0]), aa3 + np.array([18.0, 36.0, 22.0]), aa3 + np.array([29.0, 54.0, 6.0]),
            aa3 + np.array([32.0, 62.0, -34.0]), aa3 + np.array([32.0, 64.0, -274.0])]
    r_desc = 11.0 * f()
    ops += tube(arch, [r_aa, r_aa * 0.95, r_aa * 0.9, r_desc, r_desc, r_desc], BLOOD, frame, vessel_ok)
    ops += tube([aa0, aa1, aa2, aa3], [r_ao + 3.5, r_aa * 1.05, r_aa, r_aa], AA, frame, walls_ok | {LA}, flat_start=True)

    # pulmonary trunk on the pulmonary valve, bifurcating under the arch
    rvot_dir = _unit(p_pv - rvot[0])
    bif = p_pv + np.array([4.0, 14.0, 34.0]) + jit(1.5)
    trunk = [p_pv, p_pv + rvot_dir * 6.0, p_pv + np.array([2.0, 4.0, 20.0]), bif]
    rpa = [bif, p_pv + np.array([-10.0, 31.0, 32.0]), p_pv + np.array([-32.0, 39.0, 30.0])]
    rpa_out = [rpa[-1], p_pv + np.array([-62.0, 43.0, 22.0]) + jit(3.0)]
    lpa = [bif, p_pv + np.array([22.0, 21.0, 36.0]), p_pv + np.array([38.0, 33.0, 30.0])]
    lpa_out = [lpa[-1], p_pv + np.array([58.0, 41.0, 20.0]) + jit(3.0)]
    r_br = r_pa * 0.8
    ops += tube(rpa_out, [r_br * 0.9, r_br * 0.8], BLOOD_RIGHT, frame, vessel_ok)
    ops += tube(lpa_out, [r_br * 0.9, r_br * 0.8], BLOOD_RIGHT, frame, vessel_ok)
    ops += tube(trunk, [r_pa, r_pa, r_pa, r_pa], PA, frame, walls_ok, flat_start=True)
    ops += tube(rpa, [r_br, r_br, r_br * 0.9], PA, frame, walls_ok)
    ops += tube(lpa, [r_br, r_br, r_br * 0.9], PA, frame, walls_ok)
    hila["pa_r"] = rpa_out[-1]
    hila["pa_l"] = lpa_out[-1]

    # LV blood pool, then the mitral and aortic openings through the base plate
    ops.append(Paint(LV, Ellipsoid((r_cav, r_cav, l_cav), zmin=0.0), lv_frame))
    for centre, radius in ((p_m, r_mo), (p_a, r_ao)):
        ops.append(Paint(LV, Cylinder(radius, radius, zmin=-t_base, zmax=2.0), frame.child(centre, vent_rot), frozenset({MYO})))
    return HeartModel(ops, hila)


# ---------------------------------------------------------------------------------------------------
# Anatomy: the torso around the heart
# ---------------------------------------------------------------------------------------------------

TORSO_OFFSET = np.array([-15.0, 40.0, 0.0])  # torso centre relative to the heart centre (unit scale)


@dataclass(frozen=True)
class TorsoShape:
    """Body cross-section (local mm at unit scale): semi-axes, fat and chest-wall muscle thickness."""

    bx: float
    by: float
    t_fat: float
    t_mus: float
    r_vb: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "TorsoShape":
        return cls(165.0 * float(rng.uniform(0.92, 1.08)), 125.0 * float(rng.uniform(0.93, 1.07)),
                   float(rng.uniform(8.0, 22.0)), float(rng.uniform(8.0, 12.0)), 19.0 * float(rng.uniform(0.92, 1.08)))

    @property
    def cavity_front(self) -> float:
        """Distance from the torso axis forward to the inner chest wall."""
        return self.by - self.t_fat - self.t_mus

    @property
    def spine_y(self) -> float:
        return self.by - self.t_fat - 62.0

    @property
    def spine_front(self) -> float:
        return self.spine_y - self.r_vb


def torso_ops(rng: np.random.Generator, frame: Frame, shape: TorsoShape, heart_z: float = 0.0) -> list[Paint]:
    """Body (fat, muscle), thoracic cavity, lungs, liver, spine, ribs and sternum in ``frame``.

    ``frame`` is centred on the torso axis at the heart's height; ``heart_z`` (local) moves the
    diaphragm and lungs when the heart's lower border sits elsewhere.
    """
    def f(lo: float = 0.92, hi: float = 1.08) -> float:
        return float(rng.uniform(lo, hi))

    bx, by, t_fat, t_mus = shape.bx, shape.by, shape.t_fat, shape.t_mus
    cx, cy = bx - t_fat - t_mus, by - t_fat - t_mus
    z0 = heart_z
    ops: list[Paint] = [
        Paint(FAT, Cylinder(bx, by, power=2.3), frame),
        Paint(MUSCLE, Cylinder(bx - t_fat, by - t_fat, power=2.3), frame),
    ]
    cav = frame.child((0.0, -4.0, 0.0))
    ops.append(Paint(SOFT, Cylinder(cx, cy - 4.0, power=2.2), cav))
    # ribs: tilted bands in the chest wall just outside the cavity
    rib_shell = Minus(Cylinder(cx + 7.0, cy + 3.0, power=2.2), Cylinder(cx, cy - 4.0, power=2.2))
    ops.append(Paint(BONE, ZBands(rib_shell, period=28.0 * f(), duty=0.3, slope=0.35, phase=float(rng.uniform())), cav,
                     frozenset({MUSCLE, FAT})))
    # paravertebral muscle notch, then lungs in the cavity, mediastinum between them
    spine_y = shape.spine_y
    ops.append(Paint(MUSCLE, Cylinder(36.0, 34.0), frame.child((0.0, spine_y + 10.0, 0.0)), frozenset({SOFT})))
    for side in (1, -1):
        c = (side * cx * 0.48, 2.0, z0 + 30.0)
        ops.append(Paint(LUNG, Ellipsoid((cx * 0.62 * f(), cy * 1.05, 150.0 * f())), frame.child(c), frozenset({SOFT})))
    ops.append(Paint(SOFT, Cylinder(24.0 * f(), cy * 0.9), frame.child((-5.0, -cy * 0.55, 0.0)), frozenset({LUNG})))
    ops.append(Paint(SOFT, Cylinder(34.0, 30.0), frame.child((0.0, spine_y - 32.0, 0.0)), frozenset({LUNG})))
    ops.append(Paint(SOFT, Cylinder(30.0, 48.0, zmin=z0 + 30.0), frame.child((-2.0, -20.0, 0.0)), frozenset({LUNG})))
    # liver dome (right) and upper abdomen (left) under the diaphragm
    ops.append(Paint(LIVER, Ellipsoid((110.0 * f(), cy * 1.1, 110.0)), frame.child((-40.0, 0.0, z0 - 50.0 * f() - 110.0)),
                     frozenset({SOFT, LUNG})))
    ops.append(Paint(MUSCLE, Ellipsoid((90.0, cy, 100.0)), frame.child((70.0, 0.0, z0 - 72.0 * f() - 100.0)),
                     frozenset({SOFT, LUNG})))
    # spine: vertebral body (cortex, marrow, discs), canal, posterior arch, spinous process
    vb = frame.child((0.0, spine_y, 0.0))
    r_vb = shape.r_vb
    ops.append(Paint(BONE, Cylinder(r_vb, r_vb * 0.9), vb))
    ops.append(Paint(MARROW, Cylinder(r_vb - 2.5, r_vb * 0.9 - 2.5), vb))
    ops.append(Paint(DISC, ZBands(Cylinder(r_vb, r_vb * 0.9), period=27.0 * f(), duty=0.2, phase=float(rng.uniform())), vb))
    canal = frame.child((0.0, spine_y + r_vb + 10.0, 0.0))
    ops.append(Paint(BONE, Cylinder(16.0, 15.0), canal))
    ops.append(Paint(BONE, Box((4.0, 14.0, 1e4)), canal.child((0.0, 18.0, 0.0))))
    ops.append(Paint(BONE, Box((28.0, 4.0, 1e4)), canal.child((0.0, -2.0, 0.0))))
    ops.append(Paint(CSF, Cylinder(9.0, 8.0), canal))
    # sternum
    st = frame.child((0.0, -(by - t_fat - t_mus * 0.5), 0.0))
    ops.append(Paint(BONE, Box((14.0, 6.0, 1e4)), st, frozenset({MUSCLE, SOFT, FAT})))
    ops.append(Paint(MARROW, Box((12.0, 4.0, 1e4)), st, frozenset({BONE})))
    return ops


def lung_vessel_ops(rng: np.random.Generator, frame: Frame, hila: dict[str, np.ndarray], scale_r: float = 1.0) -> list[Paint]:
    """Branching vessels from the hila into the lungs (bright in CT, painted over lung only)."""
    ops: list[Paint] = []
    for name, start in sorted(hila.items()):
        cls = BLOOD_RIGHT if name.startswith("pa") else BLOOD
        side = 1.0 if name.split("_")[1].startswith("l") else -1.0
        base_dir = np.array([side, 0.4, 0.0])
        for _ in range(3):
            d = _unit(base_dir + rng.normal(0, 0.5, 3))
            r = 4.5 * scale_r
            p = np.asarray(start, float)
            for _gen in range(3):
                q = p + d * rng.uniform(22.0, 35.0)
                ops += tube([p, q], [r, r * 0.8], cls, frame, frozenset({LUNG}))
                p, r = q, r * 0.75
                d = _unit(d + rng.normal(0, 0.45, 3))
    return ops
