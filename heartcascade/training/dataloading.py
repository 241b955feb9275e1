"""batchgenerators data loaders, one per kind of training batch, and the worker pipeline around them.

=========================  =============================================  ===========================
loader                      one sample                                     used by
=========================  =============================================  ===========================
``CoarseVolumeLoader``      a whole coarse volume (+ labels), padded to    step 1 (Net1, L1_ROI)
                            Net1's divisor of 16
``SubvolumeLoader``         a full-resolution subvolume centred on a       steps 2, 3; baseline
                            class-balanced voxel; edge sizes drawn per
                            batch from the plans' set
``SliceStackLoader``        K full slices around a class-balanced slice    step 4 (Net2, Net1 frozen)
                            + where to read Net1's probabilities
=========================  =============================================  ===========================

Batches are dicts ``{"data": (B, C, D, H, W) float32, "seg": (B, 1, D, H, W) int16, "batch_index": i,
"patch_shape": [d, h, w]}``. For ``SliceStackLoader`` ``data`` holds the image channels followed by three
channels of source positions (flipping must treat them together) and ``seg`` the K label slices (the
trainer uses the centre one).

Determinism: batch number ``i`` of a loader is made from ``numpy.random.default_rng(SeedSequence([seed,
*stream, i]))`` -- and numpy's global generator is reseeded from it for batchgenerators' own transforms
-- as is Python's ``random`` -- so the batch sequence is the same whatever the number of worker processes (the
MultiThreadedAugmenter returns the workers' batches round-robin: worker ``t`` makes batches ``t, t+n,
...``) and a resumed run continues with exactly the batches the killed run would have seen
(``start_batch``).
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from heartcascade.preprocessing.resampling import clamped_indices
from heartcascade.training.augmentation import (AugmentationParams, batch_transforms, extract, plane_coordinates,
                                                random_spatial)
from heartcascade.training.sampling import CaseLocations, ClassBalancedSampler

# --------------------------------------------------------------------------------------------------
# Cases as the loaders see them


@dataclass
class TrainCase:
    """One training case in memory (canonical (D, H, W) order, see documentation/conventions.md).

    ``coarse_image`` / ``coarse_seg`` feed step 1 (and frozen Net1 at the start of step 4).
    """

    case_id: str
    image: np.ndarray  # (Cimg, D, H, W) float32
    seg: np.ndarray  # (D, H, W) integer
    spacing: tuple[float, float, float]
    locations: dict[int, np.ndarray]
    coarse_image: np.ndarray | None = None  # (Cimg, d, h, w)
    coarse_seg: np.ndarray | None = None  # (d, h, w)
    coarse_spacing: tuple[float, float, float] | None = None
    coarse_locations: dict[int, np.ndarray] = field(default_factory=dict)  # step 1's class-balanced sampling
    factors: tuple[float, float, float] = (1.0, 1.0, 1.0)  # full -> coarse scale factors (Net1's input grid)
    properties: dict[str, Any] = field(default_factory=dict)  # preprocessing properties (back to original)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.seg.shape)  # type: ignore[return-value]

    def sampler_entry(self) -> CaseLocations:
        return CaseLocations(self.case_id, self.shape, self.locations, self.seg)


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


# --------------------------------------------------------------------------------------------------
# Loaders


class _SeededLoader(DataLoader):
    """Common part: deterministic per-batch random generators, infinite stream of batches."""

    def __init__(self, cases: Sequence[TrainCase], batch_size: int, seed: int, stream: Sequence[int],
                 augmentation: AugmentationParams, start_batch: int = 0, num_workers: int = 1,
                 background_as_class: bool = True) -> None:
        super().__init__(list(cases), batch_size, num_threads_in_multithreaded=max(1, num_workers),
                         infinite=True, shuffle=False)
        if not cases:
            raise ValueError("a data loader needs at least one case")
        self.cases = list(cases)
        self.image_channels = len(self.cases[0].image)  # data's leading channels; intensity augmentation's
        self.indices = np.arange(len(self.cases))
        self.seed = int(seed)
        self.stream = [int(s) for s in stream]
        self.aug = augmentation
        self.start_batch = int(start_batch)
        self._next: int | None = None
        self.sampler = ClassBalancedSampler([c.sampler_entry() for c in self.cases],
                                            foreground_only=not background_as_class)

    def generate_train_batch(self) -> dict[str, Any]:
        if self._next is None:
            self._next = self.start_batch + self.thread_id
        index = self._next
        self._next += self.number_of_threads_in_multithreaded
        seq = np.random.SeedSequence([self.seed, *self.stream, index])
        rng = np.random.default_rng(seq)
        state = seq.generate_state(2)
        np.random.seed(int(state[0]))  # batchgenerators transforms use numpy's global RNG ...
        random.seed(int(state[1]))  # ... and Python's (noise level, blur sigma)
        batch = self.make_batch(rng)
        batch["batch_index"] = index
        return batch

    def make_batch(self, rng: np.random.Generator) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


def window_start(centre: np.ndarray, shape: Sequence[int], out: Sequence[int]) -> np.ndarray:
    """Start of an ``out``-sized window: 0 on axes where the volume fits (padding at the high end, like
    ``pad_to_multiple``), else centred on ``centre`` and shifted to stay inside the volume."""
    start = np.zeros(3, dtype=np.int64)
    for a in range(3):
        if shape[a] > out[a]:
            start[a] = int(np.clip(int(centre[a]) - out[a] // 2, 0, shape[a] - out[a]))
    return start


def pivot_about(spatial: Any, pivot: np.ndarray, grid_centre: np.ndarray) -> None:
    """Make a transform drawn for :func:`extract` (which acts about ``grid_centre``) act about ``pivot``.

    extract() maps output offset o to ``grid_centre + M o + t``; rotating/scaling about ``pivot``
    instead needs ``t += (I - M)(pivot - grid_centre)``.
    """
    if spatial.is_identity or spatial.matrix is None:
        return
    spatial.translation = spatial.translation + (np.eye(3) - spatial.matrix) @ (pivot - grid_centre)


class CoarseVolumeLoader(_SeededLoader):
    """Step 1: whole coarse volumes (uniform over cases), augmented, padded to a multiple of ``divisor``.

    The volume sits at the start of the padded grid (as with ``pad_to_multiple``; padding is image 0 /
    label 0) and the random transform acts about the volume's centre. ``max_shape`` (the plans' step-1
    ``patch_shape``, the 95th-percentile field of view Net1's memory was planned for) caps the grid: an
    axis of a (rare) larger volume is cropped to a window around a random foreground voxel.
    """

    def __init__(self, *args: Any, divisor: int = 16, max_shape: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.divisor = int(divisor)
        self.max_shape = None if max_shape is None else [round_up(int(s), self.divisor) for s in max_shape]
        for case in self.cases:
            if case.coarse_image is None or case.coarse_seg is None:
                raise ValueError(f"case {case.case_id} has no coarse image/labels for step 1")

    def make_batch(self, rng: np.random.Generator) -> dict[str, Any]:
        picks = [int(rng.integers(len(self.cases))) for _ in range(self.batch_size)]
        shapes = np.array([self.cases[i].coarse_seg.shape for i in picks])
        out_shape = [round_up(int(s), self.divisor) for s in shapes.max(0)]
        if self.max_shape is not None:
            out_shape = [min(o, m) for o, m in zip(out_shape, self.max_shape)]
        out_shape = tuple(out_shape)
        data, seg = [], []
        for i in picks:
            case = self.cases[i]
            nch = len(case.coarse_image)
            shape = np.asarray(case.coarse_seg.shape)
            centre = shape // 2
            if np.any(shape > np.asarray(out_shape)):
                fg = [v for c, v in case.coarse_locations.items() if c != 0 and len(v)]
                if fg:
                    locs = fg[int(rng.integers(len(fg)))]
                    centre = np.asarray(locs[int(rng.integers(len(locs)))])
            start = window_start(centre, shape, out_shape)
            grid_centre = start + np.asarray(out_shape) // 2
            spatial = random_spatial(rng, self.aug, case.coarse_spacing or case.spacing, out_shape)
            pivot_about(spatial, start + np.minimum(shape, out_shape) // 2, grid_centre)
            outs = extract([*case.coarse_image, case.coarse_seg], grid_centre, out_shape, spatial,
                           orders=[1] * nch + [0], dtypes=[np.float32] * nch + [np.int16])
            data.append(np.stack(outs[:-1]))
            seg.append(outs[-1][None])
        return {"data": np.stack(data), "seg": np.stack(seg), "patch_shape": list(out_shape)}


class SubvolumeLoader(_SeededLoader):
    """Steps 2 and 3 (and the baseline): class-balanced full-resolution subvolumes.

    ``patch_shapes``: the plans' set of subvolume shapes (each (d, h, w)); one is drawn per batch, so
    every batch has a single shape while the network sees several sizes over training.
    """

    def __init__(self, *args: Any, patch_shapes: Sequence[Sequence[int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not patch_shapes:
            raise ValueError("SubvolumeLoader needs at least one patch shape")
        self.patch_shapes = [tuple(int(v) for v in s) for s in patch_shapes]

    def make_batch(self, rng: np.random.Generator) -> dict[str, Any]:
        shape = self.patch_shapes[int(rng.integers(len(self.patch_shapes)))]
        data, seg, factors = [], [], []
        for _ in range(self.batch_size):
            index, _cls, centre = self.sampler.draw(rng)
            case = self.cases[index]
            factors.append(case.factors)
            nch = len(case.image)
            spatial = random_spatial(rng, self.aug, case.spacing, shape)
            outs = extract([*case.image, case.seg], centre, shape, spatial,
                           orders=[1] * nch + [0], dtypes=[np.float32] * nch + [np.int16])
            data.append(np.stack(outs[:-1]))
            seg.append(outs[-1][None])
        return {"data": np.stack(data), "seg": np.stack(seg), "patch_shape": list(shape),
                "factors": np.asarray(factors, dtype=np.float64)}


class SliceStackLoader(_SeededLoader):
    """Step 4: stacks of ``K`` slices (edge-replicated beyond the volume ends, as at inference).

    Channels of ``data``: the image channels, then three channels of *where to read frozen Net1's
    probabilities*: the full-resolution (z, y, x) position each output voxel was taken from (NaN where
    it lies outside the image: padding). The trainer reads Net1's coarse softmax there on its own
    device (:func:`heartcascade.inference.upsampling.upsample_at_points`, the predictor's trilinear
    rule), so the workers never upsample C probability channels -- the costly part of a 9x512x512
    stack -- and a flip of the batch flips image and positions together. ``case_index`` names each
    sample's case. In-plane: the full slices, padded at the high end to ``divisor`` (Net2's) with image
    0 and labels 0 -- unless the plans' ``tile`` (step-4 ``stack_shape[1:]``) is smaller, in which case
    a tile around the sampled voxel is read. Augmentation is in-plane only and identical for all K
    slices and all channels.
    """

    def __init__(self, *args: Any, K: int, divisor: int, tile: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if K < 1 or K % 2 != 1:
            raise ValueError(f"K must be odd, got {K}")
        self.K = int(K)
        self.divisor = int(divisor)
        self.tile = None if tile is None else [max(self.divisor, (int(t) // self.divisor) * self.divisor)
                                               for t in tile]

    def make_batch(self, rng: np.random.Generator) -> dict[str, Any]:
        draws = [self.sampler.draw(rng) for _ in range(self.batch_size)]
        inplane = np.array([self.cases[i].shape[1:] for i, _, _ in draws]).max(0)
        hw = [round_up(int(v), self.divisor) for v in inplane]
        if self.tile is not None:
            hw = [min(a, t) for a, t in zip(hw, self.tile)]
        out_shape = (self.K, hw[0], hw[1])
        margin = self.K // 2
        nch = self.image_channels
        data = np.empty((self.batch_size, nch + 3, *out_shape), dtype=np.float32)
        seg = np.empty((self.batch_size, 1, *out_shape), dtype=np.int16)
        for b, (index, _cls, voxel) in enumerate(draws):
            case = self.cases[index]
            D, H, W = case.shape
            z = clamped_indices(int(voxel[0]) - margin, int(voxel[0]) + margin + 1, D)
            start = window_start(np.asarray(voxel), (self.K, H, W), out_shape)
            rows = slice(int(start[1]), min(H, int(start[1]) + out_shape[1]))
            cols = slice(int(start[2]), min(W, int(start[2]) + out_shape[2]))
            image = case.image[:, z, rows, cols]
            labels = case.seg[z, rows, cols]
            local = np.asarray(labels.shape)
            grid_centre = np.asarray(out_shape) // 2
            spatial = random_spatial(rng, self.aug, case.spacing, out_shape, inplane_only=True)
            pivot_about(spatial, np.minimum(local, out_shape) // 2, grid_centre)
            outs = extract([*image, labels], grid_centre, out_shape, spatial, orders=[1] * nch + [0],
                           dtypes=[np.float32] * nch + [np.int16])
            data[b, :nch] = outs[:-1]
            seg[b, 0] = outs[-1]
            data[b, nch:] = source_positions(plane_coordinates(grid_centre, out_shape, spatial), local, z,
                                             rows.start, cols.start)
        return {"data": data, "seg": seg, "patch_shape": list(out_shape),
                "case_index": np.asarray([d[0] for d in draws], dtype=np.int64)}


def source_positions(plane: np.ndarray, local_shape: Sequence[int], z_index: np.ndarray, row0: int,
                     col0: int) -> np.ndarray:
    """Full-resolution (z, y, x) of each voxel of a K-slice stack read from a crop of ``local_shape``
    (K, h, w) at the in-plane coordinates ``plane`` (2, H, W); the crop's slices are ``z_index`` (the
    clamped slice indices) and its first row and column ``row0``, ``col0``. NaN where the image
    channels read padding (outside the crop, as ``extract``'s linear interpolation with
    ``mode='constant'``)."""
    K = len(z_index)
    out = np.empty((3, K) + plane.shape[1:], dtype=np.float32)
    out[0] = np.asarray(z_index, dtype=np.float32).reshape(K, 1, 1)
    out[1] = plane[0] + row0
    out[2] = plane[1] + col0
    outside = ((plane[0] < 0) | (plane[0] > local_shape[1] - 1) | (plane[1] < 0) | (plane[1] > local_shape[2] - 1))
    out[:, :, outside] = np.nan
    return out


# --------------------------------------------------------------------------------------------------
# Augmenter (worker processes)


def default_num_workers(plans_value: int | None = None) -> int:
    """Worker processes: env ``HC_N_PROC_DA`` wins, then the plans' value, then min(8, CPUs - 1)."""
    env = os.environ.get("HC_N_PROC_DA")
    if env is not None and env.strip() != "":
        return max(0, int(env))
    if plans_value is not None:
        return max(0, int(plans_value))
    return max(0, min(8, (os.cpu_count() or 2) - 1))


class BatchStream:
    """Iterator of batches from a loader through batchgenerators' augmenters.

    ``num_workers == 0`` uses the SingleThreadedAugmenter (in-process; tests, debugging); otherwise a
    MultiThreadedAugmenter with that many worker processes. :meth:`close` stops the workers.
    """

    def __init__(self, loader: _SeededLoader, augmentation: AugmentationParams, num_workers: int) -> None:
        transform = batch_transforms(augmentation, image_channels=loader.image_channels)
        self.num_workers = int(num_workers)
        if self.num_workers <= 0:
            self.augmenter = SingleThreadedAugmenter(loader, transform)
        else:
            self.augmenter = MultiThreadedAugmenter(loader, transform, self.num_workers,
                                                    num_cached_per_queue=2, seeds=None, pin_memory=False,
                                                    wait_time=0.002)
        self.expected = loader.start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self.augmenter)
        if batch["batch_index"] != self.expected:
            raise RuntimeError(f"data loader out of order: got batch {batch['batch_index']}, expected {self.expected}")
        self.expected += 1
        return batch

    def close(self) -> None:
        finish = getattr(self.augmenter, "_finish", None)
        if finish is not None:
            finish()
