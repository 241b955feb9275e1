"""Probabilities in nnU-Net v2's file format, so ``nnUNetv2_ensemble`` can average them with nnU-Net's.

nnU-Net writes, next to each ``CASE.nii.gz``, ``CASE.npz`` holding ``probabilities`` (classes x the
image's SimpleITK array shape (z, y, x), float32) and ``CASE.pkl`` with the image's geometry
(``{"sitk_stuff": {"spacing", "origin", "direction"}, "spacing": (z, y, x) spacing}``, what its
SimpleITK reader records). heartcascade's own ``CASE.npz`` keeps only the region of interest
(background has probability 1 outside it, see ``predictor.RoiProbabilities``); this module expands it.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from heartcascade.dataset.image_io import Geometry
from heartcascade.inference.results import RoiProbabilities
from heartcascade.utils.atomic import atomic_path, atomic_write_bytes
from heartcascade.utils.errors import HCError


def nnunet_properties(geometry: Geometry) -> dict[str, Any]:
    """The geometry dict nnU-Net's SimpleITK reader stores for an image."""
    return {"sitk_stuff": {"spacing": tuple(geometry.spacing), "origin": tuple(geometry.origin),
                           "direction": tuple(geometry.direction)},
            "spacing": [float(s) for s in reversed(geometry.spacing)]}


def write_nnunet_probability_files(probabilities: RoiProbabilities, geometry: Geometry,
                                   npz_path: str | os.PathLike) -> tuple[Path, Path]:
    """nnU-Net's full-volume ``CASE.npz`` and its ``CASE.pkl`` for probabilities on ``geometry``'s grid
    (the batch loop writes these directly with ``--nnunet-probabilities``); returns both paths."""
    npz_path = Path(npz_path)
    full = probabilities.full(np.float32)
    if full.shape[1:] != tuple(reversed(geometry.size)):
        raise HCError(f"{npz_path}: probabilities of shape {full.shape[1:]} do not fit the image of size "
                      f"{geometry.size}")
    pkl_path = npz_path.with_suffix(".pkl")
    atomic_write_bytes(pkl_path, pickle.dumps(nnunet_properties(geometry)))
    with atomic_path(npz_path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, probabilities=full)
    return npz_path, pkl_path


def read_nnunet_probabilities(npz_path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """(probabilities, properties) of an nnU-Net-style ``CASE.npz`` / ``CASE.pkl`` pair."""
    npz_path = Path(npz_path)
    with np.load(npz_path) as data:
        probabilities = data["probabilities"]
    with open(npz_path.with_suffix(".pkl"), "rb") as handle:
        properties = pickle.load(handle)
    return probabilities, properties
