"""The plans' ``augmentation`` section: probabilities and ranges of the training transforms.

Part of the typed plans (:mod:`heartcascade.planning.plans` parses the section with
:meth:`AugmentationParams.from_dict`); the transforms themselves are in
:mod:`heartcascade.training.augmentation`. documentation/plans.md lists the fields.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from heartcascade.utils.errors import HCError


@dataclass(frozen=True)
class AugmentationParams:
    """Probabilities and ranges of the random spatial transform (angles in degrees, lengths in mm)."""

    enabled: bool = True
    p_rotation: float = 0.3
    rotation_deg: tuple[float, float, float] = (15.0, 15.0, 15.0)  # max |angle| about axes D, H, W
    p_scale: float = 0.3
    scale_range: tuple[float, float] = (0.85, 1.15)  # zoom factor (>1 enlarges the anatomy)
    p_scale_per_axis: float = 0.0  # given a scaling, each axis draws its own zoom (heart shape/spacing changes)
    p_shear: float = 0.2
    shear: float = 0.1  # max |off-diagonal| of the shear matrix
    p_translation: float = 0.3
    translation_mm: float = 10.0  # max |shift| per axis
    p_elastic: float = 0.2
    elastic_magnitude_mm: float = 3.0  # std of control-point displacements
    elastic_spacing_mm: float = 32.0  # distance between control points
    p_flip: float = 0.0  # probability per sample that flipping is considered ...
    flip_axes: tuple[int, ...] = ()  # ... along these canonical axes (0=D, 1=H, 2=W), each 50 %
    # Intensity (image channels only; probabilities per sample, all off unless the plans say otherwise).
    # Images are normalised to about [-1, 1] (preprocessing.normalization), hence the modest noise.
    p_gaussian_noise: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.05)  # std of the added noise, drawn uniformly
    p_gaussian_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # in voxels; each channel blurred with probability 0.5
    p_brightness: float = 0.0
    brightness_range: tuple[float, float] = (0.75, 1.25)  # multiplier
    p_contrast: float = 0.0
    contrast_range: tuple[float, float] = (0.75, 1.25)  # factor about the mean, clipped to the old range
    p_low_resolution: float = 0.0
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)  # in-plane down- and up-sampling factor
    p_gamma: float = 0.0
    p_gamma_inverted: float = 0.0  # gamma applied to the negated image (darkens bright structures)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    # MR receive-coil shading: a smooth multiplicative field exp(polynomial), coefficients up to this size
    p_bias_field: float = 0.0
    bias_field_coefficients: tuple[float, float] = (0.0, 0.5)
    # Another scanner's intensity curve: a random monotone piecewise-linear remap of the patch's range whose
    # three inner control points (at 1/4, 1/2, 3/4 of the range) move by up to this share of the range
    p_histogram_shift: float = 0.0
    histogram_shift_range: tuple[float, float] = (0.0, 0.2)
    # Another protocol's tissue contrast: each labelled structure present in the patch multiplied by its own
    # factor drawn from this range (a smooth in-plane mask, so no label-shaped edge gives the answer away)
    p_class_intensity: float = 0.0
    class_intensity_range: tuple[float, float] = (0.6, 1.4)
    # A contracted left ventricle (systole, a thick wall): the cavity's radius times a factor from this range,
    # the wall keeping its area (training.shape_augmentation); labels = the (cavity, wall) label values, which
    # the planner finds by name (LV, Myo); empty where the dataset has no such pair
    p_cavity_contraction: float = 0.0
    cavity_contraction_range: tuple[float, float] = (0.4, 1.0)
    cavity_contraction_labels: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "plans",
                  where: str = "augmentation") -> "AugmentationParams":
        """Build from the plans' augmentation section; unknown keys are an error, missing ones default."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise HCError(f"{source}: {where} must be an object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise HCError(f"{source}: {where} has unknown key '{unknown[0]}' (known: {', '.join(sorted(names))})")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        try:
            params = cls(**kwargs)
        except TypeError as exc:
            raise HCError(f"{source}: {where}: {exc}") from None
        if len(params.rotation_deg) != 3:
            raise HCError(f"{source}: {where}: rotation_deg needs 3 values (about D, H, W), got {params.rotation_deg}")
        if len(params.scale_range) != 2 or min(params.scale_range) <= 0:
            raise HCError(f"{source}: {where}: scale_range must be two positive numbers, got {params.scale_range}")
        _check_probability(params, "p_scale_per_axis", f"{source}: {where}")
        if any(a not in (0, 1, 2) for a in params.flip_axes):
            raise HCError(f"{source}: {where}: flip_axes must be among 0, 1, 2, got {params.flip_axes}")
        for p_name, range_name in INTENSITY_FIELDS:
            _check_probability(params, p_name, f"{source}: {where}")
            lo_hi = getattr(params, range_name)
            if not isinstance(lo_hi, tuple) or len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
                raise HCError(f"{source}: {where}: {range_name} must be two numbers 0 <= low <= high, got {lo_hi}")
        _check_contraction(params, f"{source}: {where}")
        return params

    def disabled(self) -> "AugmentationParams":
        return AugmentationParams(enabled=False)

    @property
    def any_intensity(self) -> bool:
        return self.enabled and any(getattr(self, p_name) > 0 for p_name, _ in INTENSITY_FIELDS)


def _check_probability(params: AugmentationParams, name: str, where: str) -> None:
    p = getattr(params, name)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise HCError(f"{where}: {name} must be a probability in [0, 1], got {p!r}")


def _check_contraction(params: AugmentationParams, where: str) -> None:
    _check_probability(params, "p_cavity_contraction", where)
    p, lo_hi, labels = params.p_cavity_contraction, params.cavity_contraction_range, params.cavity_contraction_labels
    if not isinstance(lo_hi, tuple) or len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1.5:
        raise HCError(f"{where}: cavity_contraction_range must be two factors 0 < low <= high <= 1.5, got {lo_hi}")
    if len(labels) not in (0, 2) or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in labels):
        raise HCError(f"{where}: cavity_contraction_labels must be two foreground label values (cavity, wall) "
                      f"or empty, got {list(labels)}")
    if p > 0 and len(labels) != 2:
        raise HCError(f"{where}: p_cavity_contraction is {p} but cavity_contraction_labels is empty (the dataset "
                      f"has no labels named LV and Myo; give the (cavity, wall) label values)")


#: (probability, range) field pairs of the intensity transforms
INTENSITY_FIELDS = (("p_gaussian_noise", "noise_std"), ("p_gaussian_blur", "blur_sigma"),
                    ("p_brightness", "brightness_range"), ("p_contrast", "contrast_range"),
                    ("p_low_resolution", "low_resolution_zoom"), ("p_gamma", "gamma_range"),
                    ("p_gamma_inverted", "gamma_range"), ("p_bias_field", "bias_field_coefficients"),
                    ("p_histogram_shift", "histogram_shift_range"),
                    ("p_class_intensity", "class_intensity_range"))


def augmentation_dict(params: AugmentationParams) -> dict[str, Any]:
    """Every field of ``params`` as the plans write it (tuples as lists)."""
    return {f.name: list(v) if isinstance(v := getattr(params, f.name), tuple) else v for f in fields(params)}
