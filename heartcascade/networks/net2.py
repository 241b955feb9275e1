"""Net2: the full-resolution slice network of the cascade (SRCNN-inspired).

Net2 refines Net1's coarse answer at full in-plane resolution. It reads a slab of slices (image plus
Net1's upsampled output) and predicts the centre slice(s). Key property: **no convolution pads along
z**, so the network is fully convolutional along the slice axis with a receptive field of exactly
``K`` slices. On a stack of ``D >= K`` slices it returns the ``D - K + 1`` centre slices, each equal to
what it would predict from its own ``K``-slice window -- whole-volume inference is one pass.

z-budget rule (the ``K - 1`` slices that must be consumed):
  * contracting convs, in order, get z-kernel 3 (consuming 2 slices) while at least 2 slices of the
    budget remain, otherwise z-kernel 1;
  * the slice-wise block, one ``(r + 1, 1, 1)`` conv at the bottom, consumes the remaining ``r``
    (a 1x1x1 conv when ``r == 0``).
Every consumption is even (``K`` is odd), so skip connections can be centre-cropped to the output
depth without a half-slice shift.

There is no batch/instance normalisation: both would mix information across z (or the batch) and
break the window-equivalence above. SELU with LeCun init keeps activations normalised instead.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from heartcascade.networks.blocks import center_crop_depth, lecun_normal_
from heartcascade.utils.errors import HCError

#: Net2 input forms -- the one vocabulary of plans (``net2.input_mode``), networks, memory model and
#: inference: 'probabilities' = image channel(s) + one channel per class probability; 'labelmap' = image
#: channel(s) + Net1 argmax map scaled to [0, 1] (the paper's two-channel input).
NET2_INPUT_MODES = ("probabilities", "labelmap")


def net2_input_channels(mode: str, num_classes: int, image_channels: int = 1) -> int:
    """Channels Net2 must be built with for a given input form (see :data:`NET2_INPUT_MODES`)."""
    if mode == "labelmap":
        return image_channels + 1
    if mode == "probabilities":
        return image_channels + num_classes
    raise HCError(f"unknown Net2 input mode {mode!r}; expected one of {NET2_INPUT_MODES}")


def z_budget(K: int, num_contracting_convs: int) -> tuple[list[int], int]:
    """Split Net2's z-consumption ``K - 1``: (z-kernel of each contracting conv, slice-wise kernel)."""
    if K < 1 or K % 2 != 1:
        raise HCError(f"Net2 slab size K must be a positive odd number, got {K}")
    left = K - 1
    kernels = []
    for _ in range(num_contracting_convs):
        if left >= 2:
            kernels.append(3)
            left -= 2
        else:
            kernels.append(1)
    return kernels, left + 1


def _dropout(p: float) -> nn.Module:
    # AlphaDropout keeps SELU's mean/variance; plain dropout would break self-normalisation.
    return nn.AlphaDropout(p) if p > 0 else nn.Identity()


class _ContractingBlock(nn.Sequential):
    """Convs with in-plane 3x3 (padded) and z-kernel 1 or 3 (never padded), SELU after each."""

    def __init__(self, cin: int, cout: int, z_kernels: list[int], dropout: float) -> None:
        layers: list[nn.Module] = []
        for zk in z_kernels:
            layers += [nn.Conv3d(cin, cout, (zk, 3, 3), padding=(0, 1, 1)), nn.SELU()]
            cin = cout
        layers.append(_dropout(dropout))
        super().__init__(*layers)


class _ExpansiveBlock(nn.Sequential):
    """Two 2D (1, k, k) convs on [upsampled, centre-cropped skip], SELU after each."""

    def __init__(self, cin: int, cout: int, kernel: int, dropout: float) -> None:
        pad = kernel // 2
        super().__init__(
            nn.Conv3d(cin, cout, (1, kernel, kernel), padding=(0, pad, pad)), nn.SELU(),
            nn.Conv3d(cout, cout, (1, kernel, kernel), padding=(0, pad, pad)), nn.SELU(),
            _dropout(dropout),
        )


class _RecursiveUnit(nn.Module):
    """Weight-shared residual unit applied ``recursions`` times (DRRN-style, 2D convs).

    ``h <- (h0 + U(h)) / sqrt(2)``: every pass adds to the *same* entry features ``h0``; the
    ``1/sqrt(2)`` keeps the sum at SELU's unit variance so more recursions do not blow it up.
    """

    def __init__(self, channels: int, recursions: int) -> None:
        super().__init__()
        self.recursions = recursions
        self.conv1 = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))
        self.conv2 = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        h = h0
        for _ in range(self.recursions):
            u = F.selu(self.conv2(F.selu(self.conv1(h))))
            h = (h0 + u) * (1.0 / math.sqrt(2.0))
        return h


class Net2(nn.Module):
    """Full-resolution slice network; ``forward`` maps (N, Cin, D, H, W) to logits (N, C, D-K+1, H, W).

    Args:
        in_channels: image channels + Net1 channels (see :func:`net2_input_channels`).
        num_classes: output classes including background.
        K: odd receptive field along z (slices); 3 for 8 mm MR, 9 for CT, ...
        base_features: channels of level 0; level l has ``base_features * 2**l``.
        num_levels: number of (1, 2, 2) poolings; H and W must be divisible by ``2**num_levels``.
        recursions: passes R of the weight-shared recursive unit at the bottom (0 = none).
        max_features: cap on any level's channels.
        convs_per_level: contracting convs per level (the bottom level included).
        dropout: AlphaDropout probability at the end of each block (0 = off).
        expansive_kernel: in-plane size of the 2D expansive convs (paper: 5).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        K: int,
        base_features: int = 32,
        num_levels: int = 3,
        recursions: int = 3,
        max_features: int = 256,
        convs_per_level: int = 2,
        dropout: float = 0.0,
        expansive_kernel: int = 5,
    ) -> None:
        super().__init__()
        if num_levels < 0 or recursions < 0 or convs_per_level < 1:
            raise HCError(
                f"Net2 needs num_levels >= 0, recursions >= 0, convs_per_level >= 1; got "
                f"{num_levels}, {recursions}, {convs_per_level}"
            )
        if expansive_kernel % 2 != 1:
            raise HCError(f"Net2 expansive_kernel must be odd, got {expansive_kernel}")
        if not 0.0 <= dropout < 1.0:
            raise HCError(f"Net2 dropout must be in [0, 1), got {dropout}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, num_classes=num_classes, K=K, base_features=base_features,
            num_levels=num_levels, recursions=recursions, max_features=max_features,
            convs_per_level=convs_per_level, dropout=dropout, expansive_kernel=expansive_kernel,
        )
        self.K = K
        self.num_classes = num_classes
        self.num_levels = num_levels
        #: H and W must be divisible by this; D is free (never padded, never pooled).
        self.required_divisor = 2 ** num_levels
        self.pad_multiple = (1, self.required_divisor, self.required_divisor)

        flat, slicewise_k = z_budget(K, convs_per_level * (num_levels + 1))
        self.z_kernels = [flat[i * convs_per_level:(i + 1) * convs_per_level] for i in range(num_levels + 1)]
        self.slicewise_kernel = slicewise_k
        # Slices consumed up to the end of each level; skips are centre-cropped by (K-1-c)/2 per side.
        self.z_consumed = [sum(k - 1 for lvl in self.z_kernels[:i + 1] for k in lvl) for i in range(num_levels + 1)]

        widths = [min(base_features * 2 ** i, max_features) for i in range(num_levels + 1)]
        self.widths = widths
        self.down = nn.ModuleList()
        cin = in_channels
        for level in range(num_levels + 1):
            self.down.append(_ContractingBlock(cin, widths[level], self.z_kernels[level], dropout))
            cin = widths[level]
        self.pool = nn.MaxPool3d((1, 2, 2))
        bottom = widths[num_levels]
        self.slicewise = nn.Sequential(nn.Conv3d(bottom, bottom, (slicewise_k, 1, 1)), nn.SELU())
        self.recursive = _RecursiveUnit(bottom, recursions)
        self.up = nn.ModuleList()
        self.expand = nn.ModuleList()
        for level in reversed(range(num_levels)):
            self.up.append(nn.Sequential(
                nn.ConvTranspose3d(widths[level + 1], widths[level], (1, 2, 2), stride=(1, 2, 2)), nn.SELU()
            ))
            self.expand.append(_ExpansiveBlock(2 * widths[level], widths[level], expansive_kernel, dropout))
        self.classifier = nn.Conv3d(widths[0], num_classes, 1)
        lecun_normal_(self.modules())
        assert self.z_consumed[-1] + slicewise_k - 1 == K - 1  # receptive field is exactly K

    def output_depth(self, D: int) -> int:
        """Number of output slices for a ``D``-slice input: the ``D - K + 1`` centre slices."""
        return D - self.K + 1

    @property
    def margin(self) -> int:
        """Slices lost on each side along z: ``(K - 1) / 2``."""
        return (self.K - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the centre slices: (N, num_classes, D - K + 1, H, W)."""
        if x.dim() != 5 or x.shape[2] < self.K or x.shape[3] % self.required_divisor \
                or x.shape[4] % self.required_divisor:
            raise HCError(
                f"Net2 input must be (N, C, D, H, W) with D >= K={self.K} and H, W divisible by "
                f"{self.required_divisor}; got {tuple(x.shape)}"
            )
        skips = []
        for level in range(self.num_levels):
            x = self.down[level](x)
            skips.append(x)
            x = self.pool(x)
        x = self.down[self.num_levels](x)
        x = self.recursive(self.slicewise(x))
        for up, block, skip in zip(self.up, self.expand, reversed(skips)):
            x = up(x)
            x = block(torch.cat([x, center_crop_depth(skip, x.shape[2])], dim=1))
        return self.classifier(x)
