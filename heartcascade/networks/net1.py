"""Net1: the coarse dilated 3D U-Net of the cascade.

Net1 sees the whole (downsampled) volume, so it supplies global context -- where the heart is and
which structure is which -- that Net2's thin full-resolution slabs cannot see. Layout (23 conv
layers, as in the paper): 4 contracting blocks x 2 convs, a 2-conv bottleneck, 4 transposed-conv
up-samplings, 4 expansive blocks x 2 convs and a 1x1x1 classifier. All 5x5x5 convs are zero-padded so
they keep the shape; the four 2x2x2 poolings make the input size a multiple of 16
(:attr:`Net1.required_divisor`; pad with :func:`heartcascade.networks.pad_to_multiple`).
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import nn

from heartcascade.networks.blocks import as_triple, kaiming_relu_, make_norm, unet_forward
from heartcascade.utils.errors import HCError

Dilation = Union[int, Sequence[int]]

#: Default dilation of contracting blocks 1..4 (mirrored in expansive blocks 4..1). Grows with depth
#: but stays at 2 on the deep levels: a 5-tap kernel with dilation d spans 4d+1 voxels, and on a
#: typical coarse grid (48-128 voxels per axis) level 4 has only 6-16 voxels, so the paper's literal
#: "2n" (8 at level 4, span 33) would read mostly zero padding there.
DEFAULT_DILATIONS: tuple[int, int, int, int] = (1, 2, 2, 2)

#: The paper's literal "2n" schedule, for experiments on large coarse grids.
PAPER_DILATIONS: tuple[int, int, int, int] = (2, 4, 6, 8)


class _DilatedBlock(nn.Module):
    """Two shape-preserving k^3 convs with the same dilation, ReLU after each, then dropout."""

    def __init__(self, cin: int, cout: int, kernel_size: int, dilation: Dilation,
                 dropout: float, norm: str | None) -> None:
        super().__init__()
        dil = as_triple(dilation, "dilation")
        pad = tuple(d * (kernel_size - 1) // 2 for d in dil)
        self.conv1 = nn.Conv3d(cin, cout, kernel_size, padding=pad, dilation=dil)
        self.norm1 = make_norm(norm, cout)
        self.conv2 = nn.Conv3d(cout, cout, kernel_size, padding=pad, dilation=dil)
        self.norm2 = make_norm(norm, cout)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        return self.drop(x)


class Net1(nn.Module):
    """Coarse dilated 3D U-Net; ``forward`` returns logits of shape (N, num_classes, D, H, W).

    Args:
        in_channels: image channels of the coarse volume.
        num_classes: output classes including background.
        base_features: channels of block 1; block n has ``base_features * 2**(n-1)``.
        max_features: cap on any block's channels (bounds memory of the bottleneck).
        dilations: dilation of contracting blocks 1..4 (each an int or a (d, h, w) triple);
            expansive blocks use the mirrored value of the same level.
        dropout: dropout probability applied at the end of every block.
        kernel_size: odd conv kernel size (paper: 5).
        bottleneck_dilation: dilation of the 2 bottleneck convs (level 5 is tiny, so 1).
        norm: ``None`` (paper) or ``'instance'``.
    """

    #: Each spatial input size must be divisible by this (four 2x2x2 poolings).
    required_divisor: int = 16

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_features: int = 16,
        max_features: int = 128,
        dilations: Sequence[Dilation] = DEFAULT_DILATIONS,
        dropout: float = 0.2,
        kernel_size: int = 5,
        bottleneck_dilation: Dilation = 1,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        if len(dilations) != 4:
            raise HCError(f"Net1 needs 4 dilations (one per contracting block), got {list(dilations)}")
        if kernel_size % 2 != 1:
            raise HCError(f"Net1 kernel_size must be odd to preserve shape, got {kernel_size}")
        if not 0.0 <= dropout < 1.0:
            raise HCError(f"Net1 dropout must be in [0, 1), got {dropout}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, num_classes=num_classes, base_features=base_features,
            max_features=max_features, dilations=[d if isinstance(d, int) else list(d) for d in dilations],
            dropout=dropout, kernel_size=kernel_size,
            bottleneck_dilation=bottleneck_dilation if isinstance(bottleneck_dilation, int)
            else list(bottleneck_dilation),
            norm=norm,
        )
        self.num_classes = num_classes
        self.dilations = [as_triple(d, "dilation") for d in dilations]
        widths = [min(base_features * 2 ** i, max_features) for i in range(5)]
        self.widths = widths

        self.down = nn.ModuleList()
        cin = in_channels
        for level in range(4):
            self.down.append(_DilatedBlock(cin, widths[level], kernel_size, dilations[level], dropout, norm))
            cin = widths[level]
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = _DilatedBlock(widths[3], widths[4], kernel_size, bottleneck_dilation, dropout, norm)
        self.up = nn.ModuleList()
        self.expand = nn.ModuleList()
        for level in reversed(range(4)):
            self.up.append(nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2))
            self.expand.append(
                _DilatedBlock(2 * widths[level], widths[level], kernel_size, dilations[level], dropout, norm)
            )
        self.classifier = nn.Conv3d(widths[0], num_classes, 1)
        kaiming_relu_(self.modules())
        nn.init.normal_(self.classifier.weight, 0.0, 1.0 / widths[0] ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a coarse volume whose spatial sizes are multiples of 16."""
        if x.dim() != 5 or any(s % self.required_divisor for s in x.shape[2:]):
            raise HCError(
                f"Net1 input must be (N, C, D, H, W) with D, H, W divisible by {self.required_divisor} "
                f"(use pad_to_multiple), got {tuple(x.shape)}"
            )
        return unet_forward(self, x)

    def receptive_field(self) -> tuple[int, int, int]:
        """Theoretical receptive field (coarse voxels per axis) of one output voxel."""
        k = self.config["kernel_size"]
        bdil = as_triple(self.config["bottleneck_dilation"])
        rf = [1, 1, 1]
        jump = 1
        for dil in self.dilations:  # contracting blocks then pooling
            rf = [r + 2 * (k - 1) * d * jump for r, d in zip(rf, dil)]
            rf = [r + jump for r in rf]
            jump *= 2
        rf = [r + 2 * (k - 1) * d * jump for r, d in zip(rf, bdil)]
        for dil in reversed(self.dilations):  # a k2-s2 transposed conv adds nothing; then the block
            jump //= 2
            rf = [r + 2 * (k - 1) * d * jump for r, d in zip(rf, dil)]
        return (rf[0], rf[1], rf[2])
