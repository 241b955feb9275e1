"""Shared helpers for the heartcascade networks.

Everything here works on canonical tensors ``(N, C, D, H, W)`` where ``D`` is the slice axis
(see ``documentation/conventions.md``).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from heartcascade.utils.errors import HCError

IntOr3 = Union[int, Sequence[int]]


def as_triple(value: IntOr3, name: str = "value") -> tuple[int, int, int]:
    """Return ``value`` as a per-axis ``(d, h, w)`` triple (an int applies to all three axes)."""
    if isinstance(value, int):
        return (value, value, value)
    triple = tuple(int(v) for v in value)
    if len(triple) != 3:
        raise HCError(f"{name} must be an int or three ints (D, H, W), got {value!r}")
    return triple  # type: ignore[return-value]


def pad_to_multiple(
    x: torch.Tensor, multiple: IntOr3, mode: str = "constant", value: float = 0.0
) -> torch.Tensor:
    """Pad the three spatial axes of ``x`` (N, C, D, H, W) at their *end* up to a multiple.

    Padding only at the high end keeps voxel (0, 0, 0) in place, so callers undo it with
    :func:`crop_to_shape` and the original spatial shape. ``multiple`` may be per axis, e.g.
    ``(1, 4, 4)`` for Net2, which must never pad along ``D``.
    """
    if x.dim() != 5:
        raise HCError(f"pad_to_multiple expects a (N, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    mult = as_triple(multiple, "multiple")
    if min(mult) < 1:
        raise HCError(f"pad multiple must be >= 1, got {mult}")
    pads = [(-s) % m for s, m in zip(x.shape[2:], mult)]
    if not any(pads):
        return x
    # F.pad lists the last axis first: (w_lo, w_hi, h_lo, h_hi, d_lo, d_hi).
    spec = (0, pads[2], 0, pads[1], 0, pads[0])
    if mode == "constant":
        return F.pad(x, spec, mode="constant", value=value)
    return F.pad(x, spec, mode=mode)


def crop_to_shape(x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the first ``spatial_shape`` voxels of each spatial axis."""
    d, h, w = (int(s) for s in spatial_shape)
    if any(a < b for a, b in zip(x.shape[2:], (d, h, w))):
        raise HCError(f"cannot crop shape {tuple(x.shape[2:])} to the larger shape {(d, h, w)}")
    return x[:, :, :d, :h, :w]


def center_crop_depth(x: torch.Tensor, depth: int) -> torch.Tensor:
    """Keep the ``depth`` centre slices of ``x`` along D (the difference must be even).

    Net2's skip connections use this: an odd difference would shift the skip by half a slice
    relative to the output, which is why every z-consumption in Net2 is even.
    """
    extra = x.shape[2] - depth
    if extra < 0 or extra % 2:
        raise HCError(f"cannot centre-crop {x.shape[2]} slices to {depth} (difference must be even, >= 0)")
    start = extra // 2
    return x[:, :, start:start + depth]


def count_conv_layers(module: nn.Module) -> int:
    """Number of (transposed) convolution layers, counted as the paper counts them."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return sum(1 for m in module.modules() if isinstance(m, kinds))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def lecun_normal_(modules: Iterable[nn.Module]) -> None:
    """LeCun-normal init (std = 1/sqrt(fan_in)), which SELU's self-normalisation assumes.

    For a transposed conv whose stride equals its kernel, each output voxel receives exactly
    ``in_channels`` products, so that is its fan-in.
    """
    for m in modules:
        if isinstance(m, nn.Conv3d):
            fan_in = m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, nn.ConvTranspose3d):
            fan_in = m.in_channels // m.groups * math.prod(
                math.ceil(k / s) for k, s in zip(m.kernel_size, m.stride)
            )
        else:
            continue
        nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(fan_in))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def kaiming_relu_(modules: Iterable[nn.Module]) -> None:
    """He init for ReLU networks (Net1, baseline), so deep stacks without norm still train."""
    for m in modules:
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            if isinstance(m, nn.ConvTranspose3d):
                fan_in = m.in_channels * math.prod(
                    math.ceil(k / s) for k, s in zip(m.kernel_size, m.stride)
                )
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class InstanceNorm3d(nn.InstanceNorm3d):
    """Instance norm that passes a map of a single voxel through unchanged.

    Small subvolumes can shrink to 1x1x1 at Net1's bottleneck, where instance statistics do not
    exist (torch raises in training mode); only its affine part is applied there.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0, 0].numel() > 1:
            return super().forward(x)
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return x * self.weight.view(shape) + self.bias.view(shape)
        return x


def init_classifier_bias(classifier: nn.Conv3d, class_fractions: Sequence[float], floor: float = 1e-4) -> None:
    """Start the 1x1x1 classifier at the log class frequencies instead of 0.

    With zero biases the first softmax is uniform, and with Adam (steps of ~lr per parameter) a
    normalised network needs hundreds of iterations just to learn that most voxels are background;
    starting from the prior skips that (the focal-loss paper's prior initialisation).
    """
    if classifier.bias is None or len(class_fractions) != classifier.out_channels:
        return
    prior = torch.tensor([max(float(f), floor) for f in class_fractions], dtype=torch.float32)
    logp = prior.log()
    with torch.no_grad():
        classifier.bias.copy_((logp - logp.mean()).to(classifier.bias))


def make_norm(norm: str | None, channels: int) -> nn.Module:
    """Optional normalisation layer for the ReLU networks: ``None``/'none' or 'instance'."""
    if norm in (None, "none"):
        return nn.Identity()
    if norm == "instance":
        return InstanceNorm3d(channels, affine=True)
    raise HCError(f"unknown norm {norm!r}; expected 'none' or 'instance'")


def unet_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder–decoder pass shared by Net1 and the baseline U-Net.

    ``net`` provides ``down``, ``pool``, ``bottleneck``, ``up``, ``expand`` and ``classifier``; the
    skip of each level is concatenated after its up-convolution. Each skip is dropped as soon as it is
    concatenated: without autograd (prediction) that frees the largest map before the full-resolution
    expansive block runs (hc_predict's peak RSS on a 512x512x239 CT: 4.32 -> 3.16 GiB, benchmarks.md).
    """
    skips = []
    for block in net.down:
        x = block(x)
        skips.append(x)
        x = net.pool(x)
    x = net.bottleneck(x)
    for up, block in zip(net.up, net.expand):
        x = torch.cat([up(x), skips.pop()], dim=1)
        x = block(x)
    return net.classifier(x)
