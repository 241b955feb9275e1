"""Refuse input a model was not made for, before predicting anything (the shipped default model).

Why: a user running ``hc_predict -i IN -o OUT`` without a model of their own gets the shipped cine-MR
model, and a CT volume or a single 2D slice would come back as a confident but meaningless label map.
The model card's ``input`` section says what the model reads (``modality``, ``channels``,
``min_slices``); each input is checked against it and the first misfit stops the run with one line that
says what the model is for.

Modality: MR intensities are arbitrary non-negative units, while CT is in Hounsfield units where air
(outside the body, the lungs) is -1000. A volume with at least ``CT_AIR_FRACTION`` of its voxels at or
below ``CT_AIR_HU`` is CT-like; an MR volume essentially never has such values (magnitude images are
>= 0). For a CT model, the opposite: no voxel below ``CT_AIR_HU`` means the image is not in HU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from heartcascade.dataset.image_io import choose_slice_axis, image_array, read_image
from heartcascade.inference.cases import InputCase
from heartcascade.utils.errors import HCError

CT_AIR_HU = -500.0
CT_AIR_FRACTION = 0.02


def _slices(size: Sequence[int], spacing: Sequence[float], direction: Sequence[float]) -> int:
    return int(size[choose_slice_axis(spacing, direction)])


def input_problem(path: Path, requirements: Mapping[str, Any]) -> str | None:
    """Why the image at ``path`` does not fit ``requirements`` (the card's ``input``), or None."""
    try:
        image = read_image(path)
    except HCError as exc:  # a 2D or vector image is a misfit; an unreadable file fails as its case does
        message = str(exc).removeprefix(f"{path}: ")
        return message if ("3D image" in message or "per voxel" in message) else None
    min_slices = int(requirements.get("min_slices") or 1)
    slices = _slices(image.GetSize(), image.GetSpacing(), image.GetDirection())
    if slices < min_slices:
        return (f"only {slices} slice(s) of size {image.GetSize()}; it needs a 3D stack of at least {min_slices} "
                "slices (a single 2D slice is not enough)")
    modality = str(requirements.get("modality") or "").lower()
    if modality in ("mr", "ct"):
        values = image_array(image, path)
        air = float(np.mean(values <= CT_AIR_HU))
        if modality == "mr" and air >= CT_AIR_FRACTION:
            return (f"looks like CT, not MR ({air:.0%} of the voxels are at or below {CT_AIR_HU:g}, as air at "
                    "-1000 HU is)")
        if modality == "ct" and air == 0.0:
            return f"does not look like CT in Hounsfield units (no voxel at or below {CT_AIR_HU:g})"
    return None


def check_inputs(cases: Sequence[InputCase], card: Mapping[str, Any], model_name: str = "the model") -> None:
    """Raise one HCError for the first case that the card's model was not made for."""
    requirements = card.get("input") or {}
    purpose = card.get("purpose") or "its training data"
    channels = int(requirements.get("channels") or 1)
    for case in cases:
        if len(case.files) != channels:
            raise HCError(f"{case.files[0]}: {len(case.files)} channel files, {model_name} reads {channels}; "
                          f"it is for {purpose}")
        if case.error:  # not about the model (a broken link, a duplicate): reported with the case's failure
            continue
        for path in case.files:
            problem = input_problem(Path(path), requirements)
            if problem is not None:
                raise HCError(f"{path}: {problem}; {model_name} is for {purpose}")
