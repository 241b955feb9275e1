"""Validation during training, through the real predictor only.

The trainer hands copies of its current networks to :class:`heartcascade.inference.predictor.Predictor`
and scores each validation case with ``Predictor.predict_preprocessed`` (dynamic ROI, memory-aware Net2
chunks, label maps in the original geometry, compared with the case's labels brought back the same
way), so the curve shows what ``hc_predict`` would give. ``target == "net1"`` (steps 1-2) scores Net1's
upsampled output.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import torch

from heartcascade.inference.predictor import Predictor
from heartcascade.losses.dice import dice_scores_hard
from heartcascade.model import from_plans
from heartcascade.planning.plans import Plans
from heartcascade.preprocessing.preprocess import restore_to_original
from heartcascade.model.checkpoint import state_dict_cpu
from heartcascade.training.dataloading import TrainCase


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Hard Dice per class (num_classes,), NaN where a class is absent from both."""
    return dice_scores_hard(torch.from_numpy(np.asarray(pred, dtype=np.int64)),
                            torch.from_numpy(np.asarray(ref, dtype=np.int64)), num_classes).numpy()


def validation_predictor(configuration: str, plans: Plans, networks: Mapping[str, torch.nn.Module],
                         device: torch.device) -> Predictor:
    """A predictor on fresh copies of ``networks``.

    Copies, because the predictor changes its modules (eval mode, channels-last weights on the CPU),
    which must not leak into training (a resumed run would otherwise differ from an uninterrupted one);
    rebuilding also leaves torch.compile wrappers behind.
    """
    copies = from_plans.build_networks(configuration, plans)
    for key, net in copies.items():
        net.load_state_dict(state_dict_cpu(networks[key]))
    return Predictor(plans, copies, configuration=configuration, device=device, label_codes={},
                     tta=False)  # monitoring: cheap passes; the final validation follows the plans


@torch.no_grad()
def validation_dice(predictor: Predictor, cases: Sequence[TrainCase], target: str, num_classes: int) -> np.ndarray:
    """Mean over ``cases`` of the hard Dice per class (NaN where never present)."""
    rows = []
    for case in cases:
        res = predictor.predict_preprocessed(np.array(case.image, dtype=np.float32), case.properties,
                                             net1_only=(target == "net1"))
        ref = restore_to_original(np.asarray(case.seg), case.properties)
        rows.append(dice_per_class(res.labels, np.asarray(ref), num_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(rows), axis=0) if rows else np.full(num_classes, np.nan)
