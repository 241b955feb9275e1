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
6. with the plans' ``inference.brightening``, steps 2-5 once more on a brightened image when the first pass
   finds the blood pool darker than the training data's (:mod:`heartcascade.inference.brightening`);
7. the model's connected-component postprocessing, if it has a ``postprocessing.json``
   (:mod:`heartcascade.inference.postprocessing`).

The baseline configuration resamples the normalised image to its coarse grid (2 mm), runs the plain
3D U-Net (whole volume or sliding window) and brings the probabilities back with B-spline order 2.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from heartcascade.inference import brightening
from heartcascade.inference import roi as roi_mod
from heartcascade.inference.tta import IDENTITY, View, summed_softmax, views as tta_views
from heartcascade.inference.io_pipeline import tune_host_allocator
from heartcascade.inference.model_loading import check_compatible_plans, load_folds, model_dir_for
from heartcascade.inference.net2_runner import net2_chunks
from heartcascade.inference.postprocessing import Postprocessing, find_postprocessing, load_postprocessing
from heartcascade.inference.results import (CaseResult, PredictionReport, RoiProbabilities, load_probabilities,
                                            probabilities_path, restore_probabilities)
from heartcascade.inference.label_codes import code_lookup, label_codes_from
from heartcascade.inference.sliding_window import sliding_window_softmax
from heartcascade.inference.upsampling import upsample_at
from heartcascade.planning import memory_model
from heartcascade.planning.plans import Plans, check_override_keys, preprocess_settings, with_settings
from heartcascade.preprocessing.preprocess import preprocess_images, restore_to_original
from heartcascade.preprocessing.resampling import (bspline2_apply, bspline2_coefficients, bspline2_resample,
                                                   resample_torch, shape_for_spacing)
from heartcascade.utils.device import resolve_device
from heartcascade.utils.errors import HCError

#: Names other modules import from here (re-exported from where they live now).
__all__ = ["CaseResult", "PredictionReport", "Predictor", "RoiProbabilities", "bspline2_resample",
           "load_probabilities", "probabilities_path", "resolve_device", "tune_host_allocator"]


#: Bytes of working memory Net2 / the baseline may use per pass when the plans do not say (CPU).
DEFAULT_CPU_BUDGET = 1.0 * 2**30
#: Fraction of free GPU memory Net2 / the baseline may use per pass when the plans do not say.
GPU_BUDGET_FRACTION = 0.5

# ---------------------------------------------------------------------------------------------------
# The predictor


def tta_axes(plans: Plans) -> tuple[int, ...]:
    """Tensor dims (of ``(B, C, D, H, W)``) that test-time mirroring flips for the 3D networks: the axes the
    model was trained mirrored along (the plans' ``augmentation.flip_axes``), since a mirroring it never saw
    (a stack turned base-for-apex) only adds wrong votes; all three for models trained without mirroring."""
    augmentation = plans.augmentation
    axes = tuple(sorted(int(a) + 2 for a in augmentation.flip_axes)) if augmentation is not None else ()
    return axes or (2, 3, 4)


#: Net2's test-time mirrorings: in-plane only (Net2 reads its K slices in order, so never along z).
NET2_TTA_DIMS = (3, 4)


def square_pixels(spacing_zyx: Sequence[float], tolerance: float = 0.01) -> bool:
    """Whether a grid's in-plane spacings agree (within ``tolerance``, relative): only then is a quarter turn
    of a slice the same anatomy turned, not also stretched, so only then do quarter-turn views apply."""
    dy, dx = float(spacing_zyx[1]), float(spacing_zyx[2])
    return abs(dy - dx) <= tolerance * max(dy, dx)


class Predictor:
    """Runs trained networks (one or more folds) on cases.

    Args:
        plans: the typed plans the networks were trained with (:func:`~heartcascade.planning.plans.load_plans`,
            or a loaded fold's).
        networks: one entry per fold: ``{"net1": Net1, "net2": Net2}`` (cascade) or ``{"baseline":
            BaselineUNet3D}``; a :class:`~heartcascade.networks.cascade.Cascade` is accepted too.
        configuration: ``"cascade"`` or ``"baseline"`` (inferred from the network keys when omitted).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` or a torch.device.
        tta: average over mirrorings (Net1/baseline: the axes training mirrored, :func:`tta_axes`; Net2:
            in-plane only), with the plans' ``inference.tta_quarter_turns`` also over the in-plane quarter
            turns where the grid's pixels are square (:func:`square_pixels`); None = the plans' ``inference.tta``.
        label_codes: training label -> code for written files (default: plans' ``label_codes``).
        postprocessing: connected-component steps applied to every label map (None = none; see
            :mod:`heartcascade.inference.postprocessing`); :meth:`from_model_dir` loads the model's.
        verbose: print one line per case.
        roi_rule: where Net2 runs (:class:`~heartcascade.inference.roi.RoiRule`); default: the plans'
            ``inference.roi_rule`` (:func:`~heartcascade.inference.roi.make_roi_rule`).
    """

    def __init__(self, plans: Plans, networks: Sequence[Any] | Mapping[str, Any],
                 configuration: str | None = None, device: str | torch.device | None = "auto", tta: bool | None = None,
                 label_codes: Mapping[int, int] | None = None, dataset_json: Mapping[str, Any] | None = None,
                 verbose: bool = False, postprocessing: Postprocessing | None = None,
                 roi_rule: roi_mod.RoiRule | None = None) -> None:
        if not isinstance(plans, Plans):
            raise HCError("Predictor needs the typed plans (planning.plans.load_plans / parse_plans), not a dict")
        self.plans = plans
        self.device = resolve_device(device)
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
        self.num_classes = plans.num_classes
        self.num_channels = plans.num_input_channels
        self.inference = inf = plans.inference
        self.preprocess_settings = preprocess_settings(plans)
        self._target_ranges = [n.target_range for n in plans.normalization]
        self.tta = inf.tta if tta is None else bool(tta)
        grid = plans.net1.coarse_spacing if self.configuration == "cascade" else plans.baseline_unet.spacing
        self._views_3d = self._views(tta_axes(plans), grid)  # Net1 / baseline: one fixed grid per model
        if roi_rule is None:
            roi_rule = roi_mod.make_roi_rule(inf.roi_rule, inf.roi_margin_mm, inf.roi_min_component_fraction,
                                             inf.roi_join_distance_mm, inf.roi_centre_sigma)
        self.roi_rule = roi_mod.with_margin(roi_rule, inf.roi_margin_mm)
        self.input_mode = plans.net2.input_mode
        codes = label_codes if label_codes is not None else label_codes_from(plans.label_codes, dataset_json)
        self.label_codes = dict(codes) if codes else None
        self._lookup = code_lookup(self.label_codes, self.num_classes)
        self.postprocessing = postprocessing.check_labels(self.num_classes, "postprocessing") \
            if postprocessing is not None else None
        self.postprocessing_source: Path | None = None  # the postprocessing.json it came from, if any

    # -- construction from a model folder --------------------------------------------------------
    @classmethod
    def from_model_dir(cls, model_dir: str | Path, folds: Sequence[str | int] | None = None,
                       checkpoint: str = "final", device: str | torch.device | None = "auto", tta: bool | None = None,
                       configuration: str | None = None, verbose: bool = False,
                       postprocessing: Postprocessing | str | Path | None = "auto",
                       roi_rule: roi_mod.RoiRule | None = None,
                       inference_settings: Mapping[str, Any] | None = None) -> "Predictor":
        """Load ``model_dir`` (a configuration folder holding ``fold_<f>/`` or one fold folder).

        ``postprocessing``: ``"auto"`` = the model's ``postprocessing.json`` (:func:`find_postprocessing`:
        for an ensemble the configuration folder's, else the first fold's), None = none, or a file / object.
        ``inference_settings``: fields of the plans' ``inference`` section to try instead of the model's
        (``{"tta_quarter_turns": True}``), everything else as the model has it; checked as the plans are.
        """
        loaded = load_folds(model_dir, folds, checkpoint, configuration)
        plans = loaded[0].plans
        for other in loaded[1:]:
            check_compatible_plans(plans, other.plans, other.folder)
        if inference_settings:
            check_override_keys({"inference": dict(inference_settings)}, "inference_settings")
            plans = with_settings(plans, {"inference": dict(inference_settings)}, f"{model_dir} with inference_settings")
        source = None
        if isinstance(postprocessing, str) and postprocessing == "auto":
            source = find_postprocessing(model_dir, [f.folder for f in loaded if f.folder is not None])
            postprocessing = None
        elif isinstance(postprocessing, (str, Path)):
            source = Path(postprocessing)
        if source is not None:
            postprocessing = load_postprocessing(source).check_labels(plans.num_classes, str(source))
        predictor = cls(plans, [f.networks for f in loaded], loaded[0].configuration, device, tta,
                        dataset_json=loaded[0].dataset_json, verbose=verbose, postprocessing=postprocessing,
                        roi_rule=roi_rule)
        predictor.fold_names = [f.name for f in loaded]
        predictor.postprocessing_source = source
        return predictor

    @classmethod
    def from_dataset(cls, dataset_id: int | str, configuration: str = "cascade",
                     folds: Sequence[str | int] | None = None, **kwargs: Any) -> "Predictor":
        return cls.from_model_dir(model_dir_for(dataset_id, configuration), folds, configuration=configuration,
                                  **kwargs)

    # -- one case -----------------------------------------------------------------------------
    def preprocess(self, images: Sequence[sitk.Image], case_id: str = "case") -> tuple[np.ndarray, dict[str, Any]]:
        if len(images) != self.num_channels:
            raise HCError(f"{case_id}: {len(images)} image channel(s) given, the model needs {self.num_channels}")
        return preprocess_images(images, self.preprocess_settings, case_id)

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
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if net1_only and self.configuration != "cascade":
            raise HCError("--net1-only needs a cascade model, not a baseline")
        with torch.inference_mode():
            labels, probs, box = self._predict_networks(image, properties, return_probabilities, net1_only, timings)
            factors = self.brightening_factors(image, labels)
            if factors is not None:  # a second pass on the brightened image (inference/brightening.py)
                t = time.perf_counter()
                image = brightening.brighten(image, factors, self._target_ranges)
                labels, probs, box = self._predict_networks(image, properties, return_probabilities, net1_only, {})
                timings["brightened_pass"] = time.perf_counter() - t
        t1 = time.perf_counter()
        labels_zyx = restore_to_original(labels, properties)
        del labels
        if self.postprocessing is not None and not net1_only:  # the one place label maps are postprocessed
            labels_zyx = self.postprocessing.apply(labels_zyx)
        probs_zyx = restore_probabilities(probs, properties) if probs is not None else None
        timings["restore"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t0
        return CaseResult(labels_zyx, probs_zyx, properties, box, timings, factors)

    def _predict_networks(self, image: np.ndarray, properties: dict[str, Any], want_probs: bool, net1_only: bool,
                          timings: dict[str, float]):
        """One pass of the model's networks: labels and probabilities on the preprocessed grid, and the box."""
        if self.configuration == "cascade":
            return self._predict_cascade(image, properties, want_probs, net1_only, timings)
        return self._predict_baseline(image, properties, want_probs, timings)

    def brightening_factors(self, image: np.ndarray, labels: np.ndarray) -> list[float] | None:
        """Per channel, the factor the plans' ``inference.brightening`` gives a case whose first pass found
        ``labels`` on the preprocessed ``image``; None when off or when the case is bright enough."""
        rule = self.inference.brightening
        if rule is None:
            return None
        measured = brightening.class_brightness(image, labels, rule.label, self._target_ranges, rule.min_voxels)
        return brightening.brightening_factors(measured, rule)

    # -- cascade ------------------------------------------------------------------------------
    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t

    @torch.inference_mode()
    def _net1_probabilities(self, image_t: torch.Tensor, properties: dict[str, Any]) -> list[torch.Tensor]:
        """Per fold: Net1 softmax on the case's coarse grid, (1, C, d, h, w) float32 on the device."""
        coarse_shape = tuple(int(n) for n in properties["coarse_shape"])
        coarse = resample_torch(image_t, coarse_shape, "auto")[None]  # (1, C, d, h, w)
        views = self._views_3d
        out = []
        for fold in self.folds:
            total = summed_softmax(fold["net1"], coarse, views, self.plans.amp, fold["net1"].required_divisor)
            out.append(total / len(views))
        return out

    def roi_box(self, mean_probs: torch.Tensor, properties: dict[str, Any]) -> tuple[tuple[int, int], ...]:
        """The ROI on the full grid by the plans' ``inference.roi_rule`` (see :mod:`~heartcascade.inference.roi`);
        whole volume when Net1 finds nothing."""
        return self.roi_rule(mean_probs, properties)

    def _memory_budget(self) -> float:
        if self.inference.memory_budget_gb is not None:
            return self.inference.memory_budget_gb * 2**30
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = GPU_BUDGET_FRACTION * free
            usable = self.plans.report.memory.usable_gb
            return min(budget, float(usable) * 2**30) if usable else budget
        return DEFAULT_CPU_BUDGET

    def z_chunk_for(self, net2: torch.nn.Module, window_hw: Sequence[int], num_slices: int) -> int:
        """Output slices per Net2 pass for an in-plane window.

        The largest chunk whose Net2 pass fits the memory budget (:meth:`_memory_budget`), by the
        planner's own estimate (:func:`heartcascade.planning.memory_model.net2_inference_peak`, the real
        network traced on the meta device, float32), capped by the plans' ``inference.z_chunk`` (rule 10's
        choice for the plans' tile) and by the slices there are.
        """
        cap = self.inference.z_chunk or self.inference.max_z_chunk or num_slices
        backend = "cuda" if self.device.type == "cuda" else "cpu"
        kwargs = dict(net2.config)
        return memory_model.largest_fitting(
            lambda z: memory_model.net2_inference_peak(kwargs, z, window_hw, backend), self._memory_budget(),
            min(int(cap), int(num_slices)))

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
            views = self.net2_views(properties["spacing"])
            self._run_net2(image_t, net1_probs, shape, box, views, labels, probs_out)
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
            p = upsample_at(mean, shape, [torch.arange(a, b, device=dev), iy, ix])[0]
            labels[a:b, y0:y1, x0:x1] = p.argmax(0).to(torch.uint8).cpu().numpy()
            if probs_out is not None:
                probs_out[:, a - z0:b - z0] = p.to(torch.float16).cpu().numpy()

    def net2_views(self, spacing_zyx: Sequence[float]) -> tuple[View, ...]:
        """Net2's test-time views for a case on a grid of ``spacing_zyx`` (its in-plane mirrorings)."""
        return self._views(NET2_TTA_DIMS, spacing_zyx)

    def _views(self, dims: Sequence[int], spacing_zyx: Sequence[float]) -> tuple[View, ...]:
        """The test-time views over ``dims`` for a network on a grid of ``spacing_zyx``: none without TTA; with
        the plans' ``inference.tta_quarter_turns`` the quarter turns too, where that grid's pixels are square."""
        if not self.tta:
            return IDENTITY
        return tta_views(dims, bool(self.inference.tta_quarter_turns) and square_pixels(spacing_zyx))

    def _run_net2(self, image_t: torch.Tensor, net1_probs: list[torch.Tensor], shape, box,
                  views: Sequence[View], labels: np.ndarray, probs_out: np.ndarray | None) -> None:
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
            p = upsample_at(net1_probs[i], shape, idx)
            if mode == "probabilities":
                extra = p
            else:  # 'label': Net1 argmax scaled to [0, 1], the paper's two-channel input
                extra = p.argmax(dim=1, keepdim=True).to(p.dtype) / max(num_c - 1, 1)
            return torch.cat([img.to(extra.dtype), extra], dim=1).contiguous(memory_format=memory_format)

        chunk = self.z_chunk_for(net2, (len(inplane[0]), len(inplane[1])), box[0][1] - box[0][0])
        self.last_z_chunk = chunk
        (z0, _), (y0, y1), (x0, x1) = box
        for a, b, probs in net2_chunks(nets, make_input, box[0], shape[0], K, chunk, views,
                                         amp=self.plans.amp):
            probs = probs[:, :, crop[0], crop[1]]
            labels[a:b, y0:y1, x0:x1] = probs.argmax(0).to(torch.uint8).cpu().numpy()
            if probs_out is not None:
                probs_out[:, a - z0:b - z0] = probs.to(torch.float16).cpu().numpy()

    # -- baseline -----------------------------------------------------------------------------
    def _predict_baseline(self, image: np.ndarray, properties: dict[str, Any], want_probs: bool,
                          timings: dict[str, float]):
        t = time.perf_counter()
        shape = tuple(int(n) for n in properties["shape"])
        spacing = [float(s) for s in properties["spacing"]]
        small_shape = shape_for_spacing(shape, spacing, self.plans.baseline_unet.spacing)
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
            up = bspline2_apply(coeffs, shape, (a, b), inplane)
            labels[a:b] = up.argmax(0).to(torch.uint8).cpu().numpy()
            del up
        box = roi_mod.foreground_box(labels) or roi_mod.full_box(shape)
        probs = None
        if want_probs:
            arr = np.empty((self.num_classes,) + roi_mod.box_shape(box), dtype=np.float16)
            (z0, z1) = box[0]
            for a in range(z0, z1, chunk):
                b = min(a + chunk, z1)
                arr[:, a - z0:b - z0] = bspline2_apply(coeffs, shape, (a, b), box[1:]).to(torch.float16).cpu().numpy()
            probs = RoiProbabilities(arr, box, shape)
        timings["bspline"] = time.perf_counter() - t
        return labels, probs, box

    def _baseline_softmax(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the baseline on (1, C, d, h, w): whole volume when it fits, else sliding window."""
        divisor = int(getattr(net, "required_divisor", 16))
        patch = self.plans.baseline_unet.patch_shape
        padded_shape = [int(math.ceil(s / divisor) * divisor) for s in x.shape[2:]]
        views = self._views_3d
        whole = patch is None or int(np.prod(padded_shape)) <= int(np.prod(patch)) * 2 \
            or self._baseline_fits(net, padded_shape)
        if whole:
            return summed_softmax(net, x, views, self.plans.amp, divisor) / len(views)
        return sliding_window_softmax(net, x, patch, divisor, views, amp=self.plans.amp)

    def _baseline_fits(self, net: torch.nn.Module, padded_shape: Sequence[int]) -> bool:
        widths = getattr(net, "widths", [32])
        per_voxel = sum(w / 8 ** level for level, w in enumerate(widths)) * 6 * 4
        return per_voxel * float(np.prod(padded_shape)) <= self._memory_budget()
