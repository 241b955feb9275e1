"""The paper's comparator: a plain 3D U-Net trained on data resampled to 2 mm.

It exists to answer "does the cascade beat a standard single network at a resolution that fits in
memory?". 3x3x3 convs (zero-padded, shape-preserving), optional instance norm, ReLU, 2x2x2 max
pooling, transposed-conv up-sampling, concatenating skips. The inference code resamples its output
back to the original grid (B-spline order 2); that is not this module's job.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from heartcascade.networks.blocks import kaiming_relu_, make_norm, unet_forward
from heartcascade.utils.errors import HCError


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str | None) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1), make_norm(norm, cout), nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1), make_norm(norm, cout), nn.ReLU(inplace=True),
        )


class BaselineUNet3D(nn.Module):
    """Plain 3D U-Net; ``forward`` maps (N, Cin, D, H, W) to logits (N, num_classes, D, H, W).

    Args:
        in_channels: image channels.
        num_classes: output classes including background.
        base_features: channels of the first level; doubled per pooling.
        max_features: cap on any level's channels.
        num_levels: number of 2x2x2 poolings (default 4: five resolution stages).
        norm: 'instance' (default) or None.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_features: int = 32,
        max_features: int = 320,
        num_levels: int = 4,
        norm: str | None = "instance",
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise HCError(f"BaselineUNet3D needs num_levels >= 1, got {num_levels}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, num_classes=num_classes, base_features=base_features,
            max_features=max_features, num_levels=num_levels, norm=norm,
        )
        self.num_classes = num_classes
        #: Each spatial input size must be divisible by this.
        self.required_divisor = 2 ** num_levels
        widths = [min(base_features * 2 ** i, max_features) for i in range(num_levels + 1)]
        self.widths = widths
        self.down = nn.ModuleList()
        cin = in_channels
        for level in range(num_levels):
            self.down.append(_DoubleConv(cin, widths[level], norm))
            cin = widths[level]
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = _DoubleConv(widths[num_levels - 1], widths[num_levels], norm)
        self.up = nn.ModuleList()
        self.expand = nn.ModuleList()
        for level in reversed(range(num_levels)):
            self.up.append(nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2))
            self.expand.append(_DoubleConv(2 * widths[level], widths[level], norm))
        self.classifier = nn.Conv3d(widths[0], num_classes, 1)
        kaiming_relu_(self.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a volume whose spatial sizes are multiples of ``required_divisor``."""
        if x.dim() != 5 or any(s % self.required_divisor for s in x.shape[2:]):
            raise HCError(
                f"BaselineUNet3D input must be (N, C, D, H, W) with sizes divisible by "
                f"{self.required_divisor} (use pad_to_multiple), got {tuple(x.shape)}"
            )
        return unet_forward(self, x)
