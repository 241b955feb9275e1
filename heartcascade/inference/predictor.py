"""The predictor: raw images in, label maps on the input's own voxel grid out.

Cascade pipeline for one case (documentation/prediction.md has the full description):

1. shared preprocessing (:func:`heartcascade.preprocessing.preprocess.preprocess_images`, the code
   training data went through): crop to the body, slice axis first, normalise to [-1, 1];
2. Net1 on the whole coarse volume (area-downsampled on the device, padded to Net1's divisor and
   cropped back), softmax, averaged over mirrorings (``tta``); one result per fold;
3. dynamic tile: the ROI is the bounding box of the heart Net1 finds (fold average; the plans'
   ``inference.roi_rule``, :mod:`heartcascade.inference.roi`) mapped to full resolution and grown by
   the plans' margin (whole volume when Net1 finds nothing);
4. Net2 over the ROI, one fully convolutional pass per z-chunk; its input is the image and Net1's
   probabilities brought to full resolution with trilinear interpolation, evaluated only for the
   voxels of the chunk; Net2 softmax averaged over folds (and in-plane mirrorings);
5. argmax inside the ROI, paste into a background map, undo crop/transposition
   (:func:`~heartcascade.preprocessing.preprocess.restore_to_original`);
6. the model's connected-component postprocessing, if it has a ``postprocessing.json``
   (:mod:`heartcascade.inference.postprocessing`).

The baseline configuration resamples the normalised image to its coarse grid (2 mm), runs the plain
3D U-Net (whole volume or sliding window) and brings the probabilities back with B-spline order 2.
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from heartcascade.dataset import image_io
from heartcascade.dataset.image_io import Geometry
from heartcascade.inference import roi as roi_mod
from heartcascade.inference.cases import InputCase, cases_from_file_lists, discover_cases, shard
from heartcascade.inference.io_pipeline import BackgroundWriter, prefetch
from heartcascade.inference.net2_runner import autocast_context, auto_z_chunk, net2_chunks
from heartcascade.inference.postprocessing import Postprocessing, find_postprocessing, load_postprocessing
from heartcascade.planning.plans import ROI_DEFAULTS, roi_fields
from heartcascade.utils.atomic import atomic_path, ensure_writable_dir, remove_temp_files_of
from heartcascade.utils.device import resolve_device
from heartcascade.utils.errors import HCError

#: Bytes of working memory Net2 / the baseline may use per pass when the plans do not say (CPU).
DEFAULT_CPU_BUDGET = 1.0 * 2**30
#: Fraction of free GPU memory Net2 / the baseline may use per pass when the plans do not say.
GPU_BUDGET_FRACTION = 0.5
DEFAULT_ROI_MARGIN_MM = 10.0
DEFAULT_BASELINE_SPACING = (2.0, 2.0, 2.0)


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclass
class InferenceSettings:
    """The plans' ``inference`` section (documentation/plans.md), with defaults for missing fields."""

    roi_margin_mm: float = DEFAULT_ROI_MARGIN_MM
    z_chunk: int | None = None             # output slices per Net2 pass; None = from the memory budget
    memory_budget_bytes: float | None = None
    baseline_spacing: tuple[float, float, float] = DEFAULT_BASELINE_SPACING
    baseline_patch: tuple[int, int, int] | None = None
    max_z_chunk: int | None = None         # cap on the automatic chunk
    roi_rule: str = ROI_DEFAULTS["roi_rule"]
    roi_min_component_fraction: float = ROI_DEFAULTS["roi_min_component_fraction"]
    roi_join_distance_mm: float = ROI_DEFAULTS["roi_join_distance_mm"]

    @classmethod
    def from_plans(cls, plans: Mapping[str, Any]) -> "InferenceSettings":
        section = plans.get("inference") or {}
        if not isinstance(section, Mapping):
            raise HCError("plans: 'inference' must be an object")
        s = cls()
        margin = section.get("roi_margin_mm")
        if margin is not None:
            s.roi_margin_mm = float(margin)
        chunk = section.get("z_chunk")
        if chunk is not None:
            s.z_chunk = int(chunk)
        if section.get("max_z_chunk") is not None:
            s.max_z_chunk = int(section["max_z_chunk"])
        if section.get("memory_budget_gb") is not None:
            s.memory_budget_bytes = float(section["memory_budget_gb"]) * 2**30
        s.baseline_spacing, s.baseline_patch = _baseline_grid(plans, s.baseline_spacing)
        roi = roi_fields(dict(plans), "plans")
        s.roi_rule, s.roi_min_component_fraction = roi["roi_rule"], roi["roi_min_component_fraction"]
        s.roi_join_distance_mm = roi["roi_join_distance_mm"]
        if s.roi_margin_mm < 0:
            raise HCError(f"plans: inference.roi_margin_mm must be >= 0, got {s.roi_margin_mm}")
        if s.z_chunk is not None and s.z_chunk < 1:
            raise HCError(f"plans: inference.z_chunk must be >= 1, got {s.z_chunk}")
        return s


def _triple(value: Any, what: str) -> tuple[Any, Any, Any]:
    if isinstance(value, (int, float)):
        return (value, value, value)
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(value)  # type: ignore[return-value]
    raise HCError(f"plans: {what} must be a number or three numbers (D, H, W), got {value!r}")


def _baseline_grid(plans: Mapping[str, Any], default: tuple[float, float, float]):
    """Baseline spacing and sliding-window patch from ``baseline_unet`` (planner) or ``baseline``."""
    spacing, patch = default, None
    for name in ("baseline_unet", "baseline"):
        section = plans.get(name)
        if not isinstance(section, Mapping):
            continue
        value = section.get("spacing_mm", section.get("spacing"))
        if value is not None:
            spacing = tuple(float(v) for v in _triple(value, f"{name}.spacing_mm"))  # type: ignore[assignment]
        for key in ("patch_shape", "patch_size"):
            if section.get(key) is not None:
                patch = tuple(int(v) for v in _triple(section[key], f"{name}.{key}"))
                break
        sizes = (section.get("training") or {}).get("patch_sizes") if isinstance(section.get("training"), Mapping) else None
        if patch is None and sizes:
            patch = max((tuple(int(v) for v in _triple(p, f"{name}.training.patch_sizes")) for p in sizes),
                        key=lambda p: int(np.prod(p)))
        break
    return spacing, patch


def net2_input_mode(plans: Mapping[str, Any]) -> str:
    """Net2's input form as the networks name it: 'probs' or 'label' (plans may say probabilities/labelmap)."""
    mode = str((plans.get("net2") or {}).get("input_mode", "probs"))
    mode = {"probabilities": "probs", "labelmap": "label"}.get(mode, mode)
    if mode not in ("probs", "label"):
        raise HCError(f"plans: net2.input_mode must be 'probabilities' or 'labelmap', got {mode!r}")
    return mode


def label_codes_from(plans: Mapping[str, Any], dataset_json: Mapping[str, Any] | None = None) -> dict[int, int] | None:
    """Training label -> the dataset's own code (e.g. 1 -> 500), from the plans or dataset.json."""
    for source in (plans, dataset_json or {}):
        codes = source.get("label_codes")
        if codes:
            return {int(k): int(v) for k, v in codes.items()}
    return None


def code_lookup(label_codes: Mapping[int, int] | None, num_classes: int) -> np.ndarray | None:
    """Lookup table training label -> code in the smallest integer type that holds every code."""
    if not label_codes:
        return None
    values = [0] + [int(label_codes.get(c, c)) for c in range(1, num_classes)]
    lo, hi = min(values), max(values)
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            break
    else:
        raise HCError(f"label codes {lo}..{hi} do not fit a 32-bit integer")
    return np.asarray(values, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass
class RoiProbabilities:
    """Class probabilities inside a box; everything outside is background with probability 1.

    ``array`` is (C, *box extent) and ``box`` half-open per axis, both in the axis order of the grid
    they describe (canonical (D, H, W) inside the predictor, SimpleITK (z, y, x) once restored).
    """

    array: np.ndarray
    box: tuple[tuple[int, int], ...]
    shape: tuple[int, int, int]

    def full(self, dtype=np.float32) -> np.ndarray:
        out = np.zeros((self.array.shape[0],) + tuple(self.shape), dtype=dtype)
        out[0] = 1
        out[(slice(None),) + roi_mod.box_slices(self.box)] = self.array
        return out


@dataclass
class CaseResult:
    """Prediction of one case on the original grid (SimpleITK order)."""

    labels: np.ndarray                       # (z, y, x) training labels, uint8
    probabilities: RoiProbabilities | None   # in (z, y, x) of the original image
    properties: dict[str, Any]
    roi_box: tuple[tuple[int, int], ...]     # canonical preprocessed grid
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class PredictionReport:
    """What :meth:`Predictor.predict_files` did."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        text = f"{len(self.written)} predicted, {len(self.skipped)} skipped (output exists), {len(self.failed)} failed"
        if self.failed:
            text += ": " + ", ".join(sorted(self.failed))
        return text


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, HCError):
        return str(exc)
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------------
# The predictor


def tune_host_allocator() -> bool:
    """Let glibc reuse freed memory for large buffers instead of returning it to the OS at once.

    Net2 allocates and frees activations of tens to hundreds of MB for every z-chunk; with glibc's
    defaults each of them is a fresh ``mmap`` whose pages the kernel must zero again, which cost ~40 s
    of system time on a 512x512x239 CT. Serving blocks up to 256 MB from the heap (and keeping up to
    512 MB of freed heap) removes most of that; larger blocks (Net1's biggest maps) still go back to
    the OS at once, so peak RSS grows by only ~0.1 GB (measured: 3.47 -> 3.57 GB at paper widths on
    the CPU, against 4.6 GB with a 1 GB threshold). Process-wide, so the command-line tools call it;
    returns False where it does not apply (not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 256 << 20) == 1
        return libc.mallopt(m_trim_threshold, 512 << 20) == 1 and ok
    except (OSError, AttributeError):
        return False


def _flip_sets(ndim_spatial: int, axes: Sequence[int]) -> list[tuple[int, ...]]:
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


class Predictor:
    """Runs trained networks (one or more folds) on cases.

    Args:
        plans: the plans dict the networks were trained with.
        networks: one entry per fold: ``{"net1": Net1, "net2": Net2}`` (cascade) or ``{"baseline":
            BaselineUNet3D}``; a :class:`~heartcascade.networks.cascade.Cascade` is accepted too.
        configuration: ``"cascade"`` or ``"baseline"`` (inferred from the network keys when omitted).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` or a torch.device.
        tta: average over mirrorings (Net1/baseline: all axes; Net2: in-plane only).
        label_codes: training label -> code for written files (default: plans' ``label_codes``).
        postprocessing: connected-component steps applied to every label map (None = none; see
            :mod:`heartcascade.inference.postprocessing`); :meth:`from_model_dir` loads the model's.
        verbose: print one line per case.
    """

    def __init__(self, plans: Mapping[str, Any], networks: Sequence[Any] | Mapping[str, Any],
                 configuration: str | None = None, device: str | torch.device | None = "auto", tta: bool = False,
                 label_codes: Mapping[int, int] | None = None, dataset_json: Mapping[str, Any] | None = None,
                 verbose: bool = False, postprocessing: Postprocessing | None = None) -> None:
        self.plans = dict(plans)
        self.device = resolve_device(device)
        self.tta = bool(tta)
        self.verbose = verbose
        if isinstance(networks, Mapping) or hasattr(networks, "net1"):
            networks = [networks]
        folds: list[dict[str, torch.nn.Module]] = []
        for entry in networks:
            if hasattr(entry, "net1") and hasattr(entry, "net2"):
                entry = {"net1": entry.net1, "net2": entry.net2}
            folds.append(dict(entry))
        if not folds:
            raise HCError("Predictor needs at least one set of networks")
        keys = {frozenset(f) for f in folds}
        if len(keys) != 1:
            raise HCError("all folds must hold the same networks")
        inferred = "cascade" if {"net1", "net2"} <= set(folds[0]) else "baseline" if "baseline" in folds[0] else None
        self.configuration = configuration or inferred
        if self.configuration not in ("cascade", "baseline") or self.configuration != inferred:
            raise HCError(f"networks {sorted(folds[0])} do not form a '{configuration}' model")
        # channels-last 3D convolutions are ~1.5x faster with oneDNN on the CPU (same numbers)
        self._memory_format = torch.channels_last_3d if self.device.type == "cpu" else torch.contiguous_format
        for fold in folds:
            for net in fold.values():
                net.to(self.device).eval()
                net.to(memory_format=self._memory_format)
        self.folds = folds
        self.num_classes = int(self.plans["num_classes"])
        self.num_channels = int(self.plans["num_input_channels"])
        self.settings = InferenceSettings.from_plans(self.plans)
        self.roi_rule = roi_mod.make_roi_rule(self.settings.roi_rule, self.settings.roi_margin_mm,
                                              self.settings.roi_min_component_fraction,
                                              self.settings.roi_join_distance_mm)
        self.input_mode = net2_input_mode(self.plans)
        codes = label_codes if label_codes is not None else label_codes_from(self.plans, dataset_json)
        self.label_codes = dict(codes) if codes else None
        self._lookup = code_lookup(self.label_codes, self.num_classes)
        self.postprocessing = postprocessing.check_labels(self.num_classes, "postprocessing") \
            if postprocessing is not None else None
        self.postprocessing_source: Path | None = None  # the postprocessing.json it came from, if any

    # -- construction from a model folder --------------------------------------------------------
    @classmethod
    def from_model_dir(cls, model_dir: str | Path, folds: Sequence[str | int] | None = None,
                       checkpoint: str = "final", device: str | torch.device | None = "auto", tta: bool = False,
                       configuration: str | None = None, verbose: bool = False,
                       postprocessing: Postprocessing | str | Path | None = "auto") -> "Predictor":
        """Load ``model_dir`` (a configuration folder holding ``fold_<f>/`` or one fold folder).

        ``postprocessing``: ``"auto"`` = the model's ``postprocessing.json`` (:func:`find_postprocessing`:
        for an ensemble the configuration folder's, else the first fold's), None = none, or a file / object.
        """
        from heartcascade.inference.model_loading import load_folds

        loaded = load_folds(model_dir, folds, checkpoint, configuration)
        plans = loaded[0].plans
        for other in loaded[1:]:
            _check_compatible_plans(plans, other.plans, other.folder)
        source = None
        if isinstance(postprocessing, str) and postprocessing == "auto":
            source = find_postprocessing(model_dir, [f.folder for f in loaded if f.folder is not None])
            postprocessing = None
        elif isinstance(postprocessing, (str, Path)):
            source = Path(postprocessing)
        if source is not None:
            postprocessing = load_postprocessing(source).check_labels(int(plans["num_classes"]), str(source))
        predictor = cls(plans, [f.networks for f in loaded], loaded[0].configuration, device, tta,
                        dataset_json=loaded[0].dataset_json, verbose=verbose, postprocessing=postprocessing)
        predictor.fold_names = [f.name for f in loaded]
        predictor.postprocessing_source = source
        return predictor

    @classmethod
    def from_dataset(cls, dataset_id: int | str, configuration: str = "cascade",
                     folds: Sequence[str | int] | None = None, **kwargs: Any) -> "Predictor":
        from heartcascade.inference.model_loading import model_dir_for

        return cls.from_model_dir(model_dir_for(dataset_id, configuration), folds, configuration=configuration,
                                  **kwargs)

    # -- one case -----------------------------------------------------------------------------
    def preprocess(self, images: Sequence[sitk.Image], case_id: str = "case") -> tuple[np.ndarray, dict[str, Any]]:
        from heartcascade.preprocessing.preprocess import preprocess_images

        if len(images) != self.num_channels:
            raise HCError(f"{case_id}: {len(images)} image channel(s) given, the model needs {self.num_channels}")
        return preprocess_images(images, self.plans, case_id)

    def predict_case(self, images: Sequence[sitk.Image], return_probabilities: bool = False,
                     net1_only: bool = False, apply_label_codes: bool = False,
                     case_id: str = "case") -> tuple[np.ndarray, RoiProbabilities | None]:
        """Label map (z, y, x) in SimpleITK order with the images' size, and optionally probabilities.

        Labels are training labels (0..C-1, uint8) unless ``apply_label_codes`` (then the dataset's
        codes, see :attr:`label_codes`).
        """
        image, properties = self.preprocess(images, case_id)
        result = self.predict_preprocessed(image, properties, return_probabilities, net1_only)
        labels = self.apply_codes(result.labels) if apply_label_codes else result.labels
        return labels, result.probabilities

    def apply_codes(self, labels: np.ndarray) -> np.ndarray:
        """Training labels -> the dataset's codes (no-op without ``label_codes``)."""
        if self._lookup is None:
            return labels
        return self._lookup[labels]

    def predict_preprocessed(self, image: np.ndarray, properties: dict[str, Any],
                             return_probabilities: bool = False, net1_only: bool = False) -> CaseResult:
        """Run the networks on a preprocessed case and bring the result back to the original grid."""
        from heartcascade.preprocessing.preprocess import restore_to_original

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.configuration == "cascade":
                labels, probs, box = self._predict_cascade(image, properties, return_probabilities, net1_only, timings)
            else:
                if net1_only:
                    raise HCError("--net1-only needs a cascade model, not a baseline")
                labels, probs, box = self._predict_baseline(image, properties, return_probabilities, timings)
        t1 = time.perf_counter()
        labels_zyx = restore_to_original(labels, properties)
        del labels
        if self.postprocessing is not None and not net1_only:  # the one place label maps are postprocessed
            labels_zyx = self.postprocessing.apply(labels_zyx)
        probs_zyx = self._restore_probabilities(probs, properties) if probs is not None else None
        timings["restore"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t0
        return CaseResult(labels_zyx, probs_zyx, properties, box, timings)

    # -- cascade ------------------------------------------------------------------------------
    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t

    @torch.inference_mode()
    def _net1_probabilities(self, image_t: torch.Tensor, properties: dict[str, Any]) -> list[torch.Tensor]:
        """Per fold: Net1 softmax on the case's coarse grid, (1, C, d, h, w) float32 on the device."""
        from heartcascade.networks.blocks import crop_to_shape, pad_to_multiple
        from heartcascade.preprocessing.resampling import resample_torch

        coarse_shape = tuple(int(n) for n in properties["coarse_shape"])
        coarse = resample_torch(image_t, coarse_shape, "auto")[None]  # (1, C, d, h, w)
        flips = _flip_sets(3, (2, 3, 4)) if self.tta else [()]
        out = []
        for fold in self.folds:
            net1 = fold["net1"]
            total = None
            for dims in flips:
                x = torch.flip(coarse, dims) if dims else coarse
                x = pad_to_multiple(x, net1.required_divisor)
                with autocast_context(self.device):
                    logits = net1(x)
                probs = torch.softmax(crop_to_shape(logits.float(), coarse_shape), dim=1)
                if dims:
                    probs = torch.flip(probs, dims)
                total = probs if total is None else total + probs
            out.append(total / len(flips))
        return out

    def roi_box(self, mean_probs: torch.Tensor, properties: dict[str, Any]) -> tuple[tuple[int, int], ...]:
        """The ROI on the full grid by the plans' ``inference.roi_rule`` (see :mod:`~heartcascade.inference.roi`);
        whole volume when Net1 finds nothing."""
        return self.roi_rule(mean_probs, properties)

    def _memory_budget(self) -> float:
        if self.settings.memory_budget_bytes is not None:
            return self.settings.memory_budget_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = GPU_BUDGET_FRACTION * free
            usable = (self.plans.get("memory") or {}).get("usable_gb")
            return min(budget, float(usable) * 2**30) if usable else budget
        return DEFAULT_CPU_BUDGET

    def z_chunk_for(self, net2: torch.nn.Module, window_hw: Sequence[int], num_slices: int) -> int:
        """Output slices per Net2 pass for an in-plane window.

        The largest chunk whose Net2 pass fits the memory budget (:meth:`_memory_budget`; estimate:
        :func:`~heartcascade.inference.net2_runner.auto_z_chunk`), capped by the plans'
        ``inference.z_chunk`` (the planner's choice, at most ``max_z_chunk`` of the preset).
        """
        own = auto_z_chunk(net2, window_hw, int(net2.config["in_channels"]), self._memory_budget(), num_slices,
                           bytes_per_value=2 if self.device.type == "cuda" else 4)
        cap = self.settings.z_chunk or self.settings.max_z_chunk
        chunk = own if cap is None else min(own, cap)
        return max(1, min(int(chunk), int(num_slices)))

    def _predict_cascade(self, image: np.ndarray, properties: dict[str, Any], want_probs: bool, net1_only: bool,
                         timings: dict[str, float]):
        t = time.perf_counter()
        shape = tuple(int(n) for n in properties["shape"])
        image_t = self._image_tensor(image)
        net1_probs = self._net1_probabilities(image_t, properties)
        mean = net1_probs[0] if len(net1_probs) == 1 else torch.stack(net1_probs).mean(0)
        box = self.roi_box(mean, properties)
        timings["net1"] = time.perf_counter() - t
        t = time.perf_counter()
        labels = np.zeros(shape, dtype=np.uint8)
        roi_shape = roi_mod.box_shape(box)
        probs_out = np.zeros((self.num_classes,) + roi_shape, dtype=np.float16) if want_probs else None
        if net1_only:
            self._net1_only(mean, shape, box, labels, probs_out)
        else:
            del mean
            self._run_net2(image_t, net1_probs, shape, box, labels, probs_out)
        timings["net2" if not net1_only else "net1_upsample"] = time.perf_counter() - t
        probs = RoiProbabilities(probs_out, box, shape) if want_probs else None
        return labels, probs, box

    def _net1_only(self, mean: torch.Tensor, shape, box, labels: np.ndarray, probs_out: np.ndarray | None) -> None:
        (z0, z1), (y0, y1), (x0, x1) = box
        dev = mean.device
        iy = torch.arange(y0, y1, device=dev)
        ix = torch.arange(x0, x1, device=dev)
        per_slice = self.num_classes * (y1 - y0) * (x1 - x0) * 4 * 3
        chunk = max(1, int(256 * 2**20 // per_slice))
        for a in range(z0, z1, chunk):
            b = min(a + chunk, z1)
            p = roi_mod.upsample_at(mean, shape, [torch.arange(a, b, device=dev), iy, ix])[0]
            labels[a:b, y0:y1, x0:x1] = p.argmax(0).to(torch.uint8).cpu().numpy()
            if probs_out is not None:
                probs_out[:, a - z0:b - z0] = p.to(torch.float16).cpu().numpy()

    def _run_net2(self, image_t: torch.Tensor, net1_probs: list[torch.Tensor], shape, box, labels: np.ndarray,
                  probs_out: np.ndarray | None) -> None:
        nets = [fold["net2"] for fold in self.folds]
        net2 = nets[0]
        K = int(net2.K)
        divisor = int(net2.required_divisor)
        window = roi_mod.round_up_inside(box, (1, divisor, divisor), shape)
        dev = image_t.device
        # In-plane index lists of Net2's window (clamped = replicated where the volume is too small).
        inplane = []
        crop = []
        for axis in (1, 2):
            (w0, w1), (r0, r1) = window[axis], box[axis]
            length = int(math.ceil((w1 - w0) / divisor) * divisor)
            inplane.append(roi_mod.padded_range(w0, length, shape[axis], dev))
            crop.append(slice(r0 - w0, r1 - w0))
        num_c = self.num_classes
        mode = self.input_mode
        memory_format = self._memory_format

        def make_input(i: int, z_idx: torch.Tensor) -> torch.Tensor:
            idx = [z_idx, inplane[0], inplane[1]]
            img = roi_mod.gather(image_t, idx)[None]
            p = roi_mod.upsample_at(net1_probs[i], shape, idx)
            if mode == "probs":
                extra = p
            else:  # 'label': Net1 argmax scaled to [0, 1], the paper's two-channel input
                extra = p.argmax(dim=1, keepdim=True).to(p.dtype) / max(num_c - 1, 1)
            return torch.cat([img.to(extra.dtype), extra], dim=1).contiguous(memory_format=memory_format)

        chunk = self.z_chunk_for(net2, (len(inplane[0]), len(inplane[1])), box[0][1] - box[0][0])
        self.last_z_chunk = chunk
        (z0, _), (y0, y1), (x0, x1) = box
        for a, b, probs in net2_chunks(nets, make_input, box[0], shape[0], K, chunk, tta=self.tta):
            probs = probs[:, :, crop[0], crop[1]]
            labels[a:b, y0:y1, x0:x1] = probs.argmax(0).to(torch.uint8).cpu().numpy()
            if probs_out is not None:
                probs_out[:, a - z0:b - z0] = probs.to(torch.float16).cpu().numpy()

    # -- baseline -----------------------------------------------------------------------------
    def _predict_baseline(self, image: np.ndarray, properties: dict[str, Any], want_probs: bool,
                          timings: dict[str, float]):
        from heartcascade.preprocessing.resampling import resample_torch, shape_for_spacing

        t = time.perf_counter()
        shape = tuple(int(n) for n in properties["shape"])
        spacing = [float(s) for s in properties["spacing"]]
        small_shape = shape_for_spacing(shape, spacing, self.settings.baseline_spacing)
        image_t = self._image_tensor(image)
        small = resample_torch(image_t, small_shape, "auto")[None]
        del image_t
        total = None
        for fold in self.folds:
            p = self._baseline_softmax(fold["baseline"], small)
            total = p if total is None else total.add_(p)
        probs_small = (total / len(self.folds))[0].float().cpu().numpy()
        del total, small
        timings["baseline"] = time.perf_counter() - t
        t = time.perf_counter()
        # B-spline order 2 back to the full grid, class by class in one separable pass per z-chunk;
        # only the chunk's probabilities exist at full resolution.
        coeffs = torch.from_numpy(bspline2_coefficients(probs_small)).to(self.device)
        del probs_small
        labels = np.zeros(shape, dtype=np.uint8)
        per_slice = self.num_classes * shape[1] * shape[2] * 4 * 2
        chunk = max(1, int(256 * 2**20 // per_slice))
        inplane = roi_mod.full_box(shape)[1:]
        for a in range(0, shape[0], chunk):
            b = min(a + chunk, shape[0])
            up = _bspline2_apply(coeffs, shape, (a, b), inplane)
            labels[a:b] = up.argmax(0).to(torch.uint8).cpu().numpy()
            del up
        box = roi_mod.foreground_box(labels) or roi_mod.full_box(shape)
        probs = None
        if want_probs:
            arr = np.empty((self.num_classes,) + roi_mod.box_shape(box), dtype=np.float16)
            (z0, z1) = box[0]
            for a in range(z0, z1, chunk):
                b = min(a + chunk, z1)
                arr[:, a - z0:b - z0] = _bspline2_apply(coeffs, shape, (a, b), box[1:]).to(torch.float16).cpu().numpy()
            probs = RoiProbabilities(arr, box, shape)
        timings["bspline"] = time.perf_counter() - t
        return labels, probs, box

    def _baseline_softmax(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the baseline on (1, C, d, h, w): whole volume when it fits, else sliding window."""
        from heartcascade.networks.blocks import crop_to_shape, pad_to_multiple

        divisor = int(getattr(net, "required_divisor", 16))
        patch = self.settings.baseline_patch
        padded_shape = [int(math.ceil(s / divisor) * divisor) for s in x.shape[2:]]
        flips = _flip_sets(3, (2, 3, 4)) if self.tta else [()]
        whole = patch is None or int(np.prod(padded_shape)) <= int(np.prod(patch)) * 2 \
            or self._baseline_fits(net, padded_shape)
        if whole:
            total = None
            for dims in flips:
                xin = torch.flip(x, dims) if dims else x
                with autocast_context(self.device):
                    logits = net(pad_to_multiple(xin, divisor))
                p = torch.softmax(crop_to_shape(logits.float(), x.shape[2:]), dim=1)
                if dims:
                    p = torch.flip(p, dims)
                total = p if total is None else total.add_(p)
            return total / len(flips)
        return sliding_window_softmax(net, x, patch, divisor, flips, self.device)

    def _baseline_fits(self, net: torch.nn.Module, padded_shape: Sequence[int]) -> bool:
        widths = getattr(net, "widths", [32])
        per_voxel = sum(w / 8 ** level for level, w in enumerate(widths)) * 6 * 4
        return per_voxel * float(np.prod(padded_shape)) <= self._memory_budget()

    # -- restoring probabilities --------------------------------------------------------------
    def _restore_probabilities(self, probs: RoiProbabilities, properties: dict[str, Any]) -> RoiProbabilities:
        from heartcascade.preprocessing.preprocess import restore_to_original

        original = tuple(int(n) for n in properties["original_shape_zyx"])
        if properties.get("inplane_resampled"):
            full = restore_to_original(probs.full(np.float32), properties)
            return RoiProbabilities(full.astype(np.float16), roi_mod.full_box(original), original)
        slice_axis = int(properties["slice_axis"])
        axes = image_io.canonical_axes(slice_axis)  # canonical axis k is zyx axis axes[k]
        crop = properties["crop_bbox_zyx"]
        box_zyx: list[tuple[int, int]] = [(0, 0)] * 3
        for k, (a, b) in enumerate(probs.box):
            off = int(crop[axes[k]][0])
            box_zyx[axes[k]] = (a + off, b + off)
        array = np.ascontiguousarray(image_io.from_canonical(probs.array, slice_axis))
        return RoiProbabilities(array, tuple(box_zyx), original)

    # -- many cases ---------------------------------------------------------------------------
    def predict_files(self, inputs: str | Path | Sequence[Sequence[str | Path]] | Sequence[InputCase],
                      output_dir: str | Path, overwrite: bool = False, save_probabilities: bool = False,
                      net1_only: bool = False, part_id: int = 0, num_parts: int = 1,
                      case_ids: Sequence[str] | None = None, apply_label_codes: bool = True,
                      background_io: bool = True, log: Callable[[str], None] | None = None) -> PredictionReport:
        """Predict every case of ``inputs`` into ``output_dir``; one case failing never stops the others.

        ``inputs``: a folder / file / DICOM folder (see :mod:`heartcascade.inference.cases`), a list of
        per-case file lists (``case_ids`` optionally names them), or a list of ``InputCase``.
        """
        if log is None:
            log = (lambda msg: print(msg, flush=True)) if self.verbose else (lambda msg: None)
        output_dir = Path(output_dir)
        if isinstance(inputs, (str, Path)):
            cases = discover_cases(inputs, self.num_channels, output_dir=output_dir)
        elif inputs and all(isinstance(c, InputCase) for c in inputs):
            cases = list(inputs)  # type: ignore[arg-type]
        else:
            cases = cases_from_file_lists(inputs, case_ids)  # type: ignore[arg-type]
        cases = shard(cases, part_id, num_parts)
        ensure_writable_dir(output_dir)
        report = PredictionReport()
        todo: list[InputCase] = []
        for case in cases:
            out = case.output_path(output_dir)
            wanted = [out, probabilities_path(out)] if save_probabilities else [out]
            for path in wanted:  # leftovers of a killed run of this case (this shard owns it)
                remove_temp_files_of(path)
            if case.error:
                report.failed[case.case_id] = case.error
                log(f"{case.case_id}: FAILED: {case.error}")
            elif all(p.exists() for p in wanted) and not overwrite:
                report.skipped.append(case.case_id)
                log(f"{case.case_id}: skipped, {out} exists (use --overwrite)")
            else:
                todo.append(case)

        def load(case: InputCase):
            images = [image_io.read_image(f) for f in case.files]
            geometry = Geometry.of(images[0])
            image, properties = self.preprocess(images, case.case_id)
            del images
            return image, properties, geometry

        writer = BackgroundWriter(max_pending=2, enabled=background_io)
        for loaded in prefetch(todo, load, ahead=1 if background_io else 0):
            case = loaded.item
            if loaded.error is not None:
                report.failed[case.case_id] = _one_line(loaded.error)
                log(f"{case.case_id}: FAILED: {report.failed[case.case_id]}")
                continue
            image, properties, geometry = loaded.value
            loaded.value = None
            try:
                t = time.perf_counter()
                result = self.predict_preprocessed(image, properties, save_probabilities, net1_only)
                del image
                labels = self.apply_codes(result.labels) if apply_label_codes else result.labels
                out = case.output_path(output_dir)
                reference = case.files[0] if case.files[0].is_file() else None
                writer.submit(case.case_id, _write_outputs, labels, geometry, out, reference,
                              result.probabilities if save_probabilities else None, self.num_classes)
                report.outputs[case.case_id] = out
                log(f"{case.case_id}: predicted in {time.perf_counter() - t:.1f} s -> {out}")
                del result, labels
            except Exception as exc:  # one case failing must not stop the others
                report.failed[case.case_id] = _one_line(exc)
                log(f"{case.case_id}: FAILED: {report.failed[case.case_id]}")
        for case_id, exc in writer.close().items():
            report.failed[case_id] = _one_line(exc)
            report.outputs.pop(case_id, None)
            log(f"{case_id}: FAILED while writing: {report.failed[case_id]}")
        report.written = sorted(report.outputs)
        return report


def _check_compatible_plans(a: Mapping[str, Any], b: Mapping[str, Any], where: Any) -> None:
    """Folds are averaged voxel by voxel, so they must share preprocessing, grids and classes."""
    keys = ("num_classes", "num_input_channels", "modality", "normalization", "full_resolution", "cropping")
    for key in keys:
        if a.get(key) != b.get(key):
            raise HCError(f"{where}: plans '{key}' differ from the first fold's; folds cannot be averaged")
    for section, sub in (("net1", "coarse_spacing"), ("net2", "K"), ("net2", "input_mode"),
                         ("baseline_unet", "spacing"), ("baseline", "spacing")):
        va = (a.get(section) or {}).get(sub)
        vb = (b.get(section) or {}).get(sub)
        if va != vb:
            raise HCError(f"{where}: plans '{section}.{sub}' differ from the first fold's ({va} vs {vb})")


def _bspline2_weight(t: torch.Tensor) -> torch.Tensor:
    """The quadratic B-spline kernel beta2(t)."""
    a = t.abs()
    return torch.where(a < 0.5, 0.75 - a * a, torch.where(a < 1.5, 0.5 * (1.5 - a) ** 2, torch.zeros_like(a)))


def bspline2_matrix(positions: torch.Tensor, in_size: int, out_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(len(positions), in_size) matrix evaluating an order-2 B-spline (coefficients on a grid of
    ``in_size`` cells) at the centres of ``positions`` on a grid of ``out_size`` cells covering the same
    extent. Mirror boundary (as ITK and ``scipy.ndimage`` with ``mode='mirror'``); positions beyond the
    first/last coarse centre (at most half a coarse voxel) are clamped to it (nearest extrapolation)."""
    x = ((positions.double() + 0.5) * (in_size / out_size) - 0.5).clamp(0.0, in_size - 1.0)
    m = torch.zeros((positions.numel(), in_size), dtype=torch.float64, device=positions.device)
    rows = torch.arange(positions.numel(), device=positions.device)
    centre = torch.floor(x + 0.5).long()
    for offset in (-1, 0, 1):
        k = centre + offset
        w = _bspline2_weight(x - k.double())
        if in_size == 1:
            k = torch.zeros_like(k)
        else:
            period = 2 * (in_size - 1)
            k = torch.remainder(k, period)
            k = torch.where(k > in_size - 1, period - k, k)
        m.index_put_((rows, k), w, accumulate=True)
    return m.to(dtype)


def bspline2_coefficients(array: np.ndarray) -> np.ndarray:
    """Order-2 B-spline coefficients (mirror boundary) of a (..., d, h, w) float array, float32."""
    from scipy import ndimage

    lead = array.shape[:-3]
    flat = np.asarray(array, dtype=np.float64).reshape((-1,) + array.shape[-3:])
    out = np.empty(flat.shape, dtype=np.float32)
    for i, vol in enumerate(flat):
        out[i] = ndimage.spline_filter(vol, order=2, mode="mirror", output=np.float64)
    return out.reshape(lead + array.shape[-3:])


def bspline2_resample(array: np.ndarray, full_spacing: Sequence[float], full_shape: Sequence[int]) -> np.ndarray:
    """B-spline (order 2) resampling of a (d, h, w) float array to ``full_shape`` over the same extent.

    Both grids are cell-centred and cover the same box. Separable: after the (small) prefilter, each
    axis is one product with :func:`bspline2_matrix`. ``full_spacing`` is accepted for symmetry with
    other resamplers; only the shapes matter because both grids span the same extent.
    """
    coeffs = torch.from_numpy(bspline2_coefficients(array)[None])
    return _bspline2_apply(coeffs, tuple(int(n) for n in full_shape), (0, int(full_shape[0])),
                           roi_mod.full_box(full_shape)[1:])[0].numpy()


def _bspline2_apply(coeffs: torch.Tensor, full_shape: tuple[int, int, int], z_range: tuple[int, int],
                    inplane_box: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Evaluate coefficients (C, d, h, w) on output slices ``z_range`` and the in-plane box: (C, L, Hb, Wb)."""
    dev = coeffs.device
    _, d, h, w = coeffs.shape
    mz = bspline2_matrix(torch.arange(*z_range, device=dev), d, full_shape[0])
    my = bspline2_matrix(torch.arange(*inplane_box[0], device=dev), h, full_shape[1])
    mx = bspline2_matrix(torch.arange(*inplane_box[1], device=dev), w, full_shape[2])
    out = torch.einsum("zd,cdhw->czhw", mz, coeffs)  # (C, L, h, w)
    out = torch.matmul(out, mx.t())                   # (C, L, h, Wb)
    return torch.matmul(my, out)                      # (C, L, Hb, Wb)


def _gaussian_weights(patch: Sequence[int], device: torch.device) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(p, dtype=torch.float32, device=device) for p in patch], indexing="ij")
    w = torch.ones(tuple(patch), device=device)
    for g, p in zip(grids, patch):
        sigma = p / 8.0
        w = w * torch.exp(-0.5 * ((g - (p - 1) / 2) / sigma) ** 2)
    w = w / w.max()
    return w.clamp_(min=1e-3)


def sliding_window_softmax(net: torch.nn.Module, x: torch.Tensor, patch: Sequence[int], divisor: int,
                           flips: Sequence[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """Gaussian-weighted average of softmax over half-overlapping tiles of ``patch`` (baseline only)."""
    from heartcascade.networks.blocks import pad_to_multiple

    patch = [int(math.ceil(p / divisor) * divisor) for p in patch]
    shape = list(x.shape[2:])
    if any(s < p for s, p in zip(shape, patch)):
        x = F.pad(x, [0, max(0, patch[2] - shape[2]), 0, max(0, patch[1] - shape[1]), 0, max(0, patch[0] - shape[0])],
                  mode="replicate")
    x = pad_to_multiple(x, divisor)
    full = list(x.shape[2:])
    starts = []
    for s, p in zip(full, patch):
        n = max(1, int(math.ceil((s - p) / (p / 2))) + 1)
        starts.append(sorted({int(round(i * (s - p) / max(n - 1, 1))) for i in range(n)}))
    weight = _gaussian_weights(patch, x.device)
    total = torch.zeros((1, net.num_classes) + tuple(full), device=x.device)
    norm = torch.zeros(tuple(full), device=x.device)
    for z in starts[0]:
        for y in starts[1]:
            for w in starts[2]:
                sl = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(w, w + patch[2]))
                tile = x[(slice(None), slice(None)) + sl]
                acc = None
                for dims in flips:
                    tin = torch.flip(tile, dims) if dims else tile
                    with autocast_context(device):
                        logits = net(tin)
                    p = torch.softmax(logits.float(), dim=1)
                    if dims:
                        p = torch.flip(p, dims)
                    acc = p if acc is None else acc.add_(p)
                total[(slice(None), slice(None)) + sl] += acc / len(flips) * weight
                norm[sl] += weight
    total /= norm
    return total[:, :, :shape[0], :shape[1], :shape[2]]


def _write_outputs(labels: np.ndarray, geometry: Geometry, out: Path, reference: Path | None,
                   probabilities: RoiProbabilities | None, num_classes: int) -> None:
    """Probabilities first, label map last: a label map on disk means the case is complete."""
    if probabilities is not None:
        path = probabilities_path(out)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, probabilities=probabilities.array, bbox_zyx=np.asarray(probabilities.box),
                                shape_zyx=np.asarray(probabilities.shape), num_classes=np.asarray(num_classes))
    image_io.write_array(labels, geometry, out, reference=reference)


def probabilities_path(label_path: str | Path) -> Path:
    label_path = Path(label_path)
    return label_path.with_name(image_io.strip_image_ending(label_path.name) + ".npz")


def load_probabilities(path: str | Path) -> RoiProbabilities:
    """Read a ``CASE.npz`` written with ``--save-probabilities``."""
    with np.load(path) as data:
        return RoiProbabilities(data["probabilities"], tuple(tuple(int(v) for v in r) for r in data["bbox_zyx"]),
                                tuple(int(v) for v in data["shape_zyx"]))
