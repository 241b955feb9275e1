"""In-memory forward passes on whole preprocessed cases, for validation during training.

* :func:`net1_coarse_probs` -- frozen/eval Net1 on a case's whole coarse volume (padded to 16), softmax.
  Step 4 precomputes these once per training case; the cascade validation uses them too.
* :func:`predict_cascade` -- Net1 on the whole coarse volume, then Net2 over all slices in z-chunks with
  Net1's probabilities upsampled (exact trilinear) only for the slices of the chunk; slices beyond the
  volume ends are edge-replicated, as at inference.
* :func:`predict_net1` -- Net1's argmax on the coarse grid (validation target of steps 1 and 2).
* :func:`predict_baseline` -- the baseline U-Net by overlapping tiles (sliding window) on its grid.

These are deliberately simple; the real predictor (heartcascade.inference) adds ROI cropping, test-time
mirroring and writing to the original geometry. Results are compared with :func:`dice_per_class`.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from heartcascade.losses.dice import dice_scores_hard
from heartcascade.networks.blocks import crop_to_shape, pad_to_multiple
from heartcascade.training.augmentation import linear_weights


def autocast(device: torch.device, amp: str = "bf16"):
    if device.type == "cuda" and amp in ("bf16", "fp16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def net1_coarse_probs(net1: torch.nn.Module, coarse_image: np.ndarray, device: torch.device,
                      amp: str = "bf16") -> torch.Tensor:
    """Softmax of Net1 on a whole coarse volume (C, d, h, w), float32 on ``device``."""
    x = torch.from_numpy(np.array(coarse_image, dtype=np.float32)).to(device)[None]
    shape = x.shape[2:]
    with autocast(device, amp):
        logits = net1(pad_to_multiple(x, 16))
    return torch.softmax(crop_to_shape(logits, shape).float(), dim=1)[0]


def upsample_slices(coarse: torch.Tensor, full_shape: Sequence[int], z: torch.Tensor) -> torch.Tensor:
    """Trilinear (align_corners=False) upsampling of (C, d, h, w) to ``full_shape`` at slices ``z`` only."""
    out = coarse
    for axis, (idx, f) in enumerate(zip([z, None, None], full_shape)):
        n = out.shape[axis + 1]
        positions = np.arange(int(f)) if idx is None else idx.cpu().numpy()
        i0, i1, w1 = linear_weights(positions, n, int(f))
        i0 = torch.as_tensor(i0, device=out.device)
        i1 = torch.as_tensor(i1, device=out.device)
        shape = [1] * out.dim()
        shape[axis + 1] = -1
        w = torch.as_tensor(w1, device=out.device, dtype=out.dtype).view(shape)
        a = out.index_select(axis + 1, i0)
        b = out.index_select(axis + 1, i1)
        out = a + (b - a) * w
    return out


@torch.no_grad()
def predict_cascade(cascade: torch.nn.Module, image: np.ndarray, coarse_probs: torch.Tensor,
                    device: torch.device, chunk: int = 16, amp: str = "bf16") -> np.ndarray:
    """Cascade label map (D, H, W) uint8 of a whole case from its image and Net1's coarse probabilities."""
    net2 = cascade.net2
    K = int(net2.K)
    m = (K - 1) // 2
    Cimg, D, H, W = image.shape
    div = int(net2.required_divisor)
    Hp, Wp = -(-H // div) * div, -(-W // div) * div
    out = np.zeros((D, H, W), dtype=np.uint8)
    img = torch.from_numpy(np.array(image, dtype=np.float32))
    for a in range(0, D, max(1, chunk)):
        b = min(D, a + max(1, chunk))
        z = torch.arange(a - m, b + m).clamp_(0, D - 1)
        x = img[:, z].to(device)[None]
        probs = upsample_slices(coarse_probs, (D, H, W), z)[None]
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, Wp - W, 0, Hp - H))
            bg = torch.zeros_like(probs[:, :, :, :1, :1])
            bg[:, 0] = 1.0
            probs = F.pad(probs, (0, Wp - W, 0, Hp - H))
            pad_mask = torch.ones((1, 1, 1, Hp, Wp), dtype=torch.bool, device=probs.device)
            pad_mask[..., :H, :W] = False
            probs = torch.where(pad_mask, bg.expand_as(probs), probs)
        with autocast(device, amp):
            logits = net2(cascade.net2_input(x, probs))
        out[a:b] = logits[0, :, :, :H, :W].float().argmax(0).to(torch.uint8).cpu().numpy()
    return out


@torch.no_grad()
def predict_net1(net1: torch.nn.Module, coarse_image: np.ndarray, device: torch.device, amp: str = "bf16") -> np.ndarray:
    return net1_coarse_probs(net1, coarse_image, device, amp).argmax(0).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def predict_baseline(net: torch.nn.Module, image: np.ndarray, patch: Sequence[int], device: torch.device,
                     divisor: int = 16, amp: str = "bf16") -> np.ndarray:
    """Sliding-window (50 % overlap, uniform average of softmax) prediction of a whole volume."""
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None]
    shape = x.shape[2:]
    patch = [min(-(-int(p) // divisor) * divisor, -(-int(s) // divisor) * divisor) for p, s in zip(patch, shape)]
    x = pad_to_multiple(x, divisor)
    padded = x.shape[2:]
    patch = [min(p, s) for p, s in zip(patch, padded)]
    starts = []
    for s, p in zip(padded, patch):
        step = max(1, p // 2)
        pos = list(range(0, max(1, s - p + 1), step))
        if pos[-1] != s - p:
            pos.append(s - p)
        starts.append(pos)
    num_classes = None
    acc = None
    count = torch.zeros((1, 1) + tuple(padded))
    for z, y, w in itertools.product(*starts):
        sl = (slice(None), slice(None), slice(z, z + patch[0]), slice(y, y + patch[1]), slice(w, w + patch[2]))
        with autocast(device, amp):
            logits = net(x[sl].to(device))
        probs = torch.softmax(logits.float(), 1).cpu()
        if acc is None:
            num_classes = probs.shape[1]
            acc = torch.zeros((1, num_classes) + tuple(padded))
        acc[sl] += probs
        count[sl] += 1
    probs = crop_to_shape(acc / count, shape)
    return probs[0].argmax(0).to(torch.uint8).numpy()


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Hard Dice per class (num_classes,), NaN where a class is absent from both."""
    return dice_scores_hard(torch.from_numpy(np.asarray(pred, dtype=np.int64)),
                            torch.from_numpy(np.asarray(ref, dtype=np.int64)), num_classes).numpy()
