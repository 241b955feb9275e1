"""The Net1 -> Net2 cascade as one module, for end-to-end training (step 3) and frozen-Net1 training (step 4).

Given a full-resolution subvolume, the cascade builds Net1's coarse view itself (downsample, pad to
16), runs Net1, brings Net1's softmax back to the subvolume grid, and feeds image + Net1 output to
Net2. Doing the resampling inside the module (with differentiable torch ops) is what lets the Dice
loss on Net2's output reach Net1's weights in end-to-end training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from heartcascade.networks.blocks import crop_to_shape, pad_to_multiple
from heartcascade.networks.net1 import Net1
from heartcascade.networks.net2 import NET2_INPUT_MODES, Net2, net2_input_channels
from heartcascade.utils.errors import HCError


@dataclass
class CascadeOutput:
    """What one cascade forward returns.

    Attributes:
        net1_logits: Net1 logits on the coarse grid, padding removed: (N, C, *coarse_shape).
        coarse_shape: Net1's grid for this input (before padding to Net1's divisor).
        padded_coarse_shape: the grid Net1 actually ran on.
        net1_probs: Net1's softmax brought to the input grid, (N, C, D, H, W) -- Net2's extra input.
        net2_logits: Net2 logits of the centre slices, (N, C, D - K + 1, H, W).
    """

    net1_logits: torch.Tensor
    coarse_shape: tuple[int, int, int]
    padded_coarse_shape: tuple[int, int, int]
    net1_probs: torch.Tensor
    net2_logits: torch.Tensor


def coarse_shape_for(full_shape: Sequence[int], scale_factors: Sequence[float]) -> tuple[int, int, int]:
    """Net1 grid for a full-resolution (D, H, W): ``round(size * factor)`` per axis, at least 1.

    ``scale_factors`` are the plans' per-axis full->coarse factors, e.g. (0.5, 0.25, 0.25). Rounds
    half up (not Python's half-to-even) so the same input always gives the same grid.
    """
    if len(full_shape) != 3 or len(scale_factors) != 3:
        raise HCError(f"need 3 sizes and 3 scale factors, got {list(full_shape)} and {list(scale_factors)}")
    if any(f <= 0 for f in scale_factors):
        raise HCError(f"coarse scale factors must be > 0, got {list(scale_factors)}")
    return tuple(max(1, int(math.floor(s * f + 0.5))) for s, f in zip(full_shape, scale_factors))  # type: ignore[return-value]


def downsample_labels(labels: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of integer labels (N, D, H, W) or (N, 1, D, H, W), e.g. for Net1's loss."""
    squeeze = labels.dim() == 4
    x = labels[:, None] if squeeze else labels
    out = F.interpolate(x.float(), size=tuple(int(s) for s in shape), mode="nearest-exact").to(labels.dtype)
    return out[:, 0] if squeeze else out


class Cascade(nn.Module):
    """Net1 (coarse, whole view) followed by Net2 (full resolution, K-slice receptive field).

    Args:
        net1: the coarse network; its ``in_channels`` must equal ``image_channels``.
        net2: the slice network, built with ``net2_input_channels(input_mode, C, image_channels)``.
        input_mode: 'probabilities' (image + C class probabilities) or 'labelmap' (the paper's two-channel
            image + argmax map scaled to [0, 1]; argmax is not differentiable, so no gradient reaches
            Net1 through Net2's loss in this mode).
        image_channels: image channels of the input.
        scale_factors: default per-axis full->coarse factors (can be overridden per call).
        downsample_mode: 'area' (averages, no aliasing; default) or 'trilinear' for the image.
    """

    def __init__(
        self,
        net1: Net1,
        net2: Net2,
        input_mode: str = "probabilities",
        image_channels: int = 1,
        scale_factors: Optional[Sequence[float]] = None,
        downsample_mode: str = "area",
    ) -> None:
        super().__init__()
        if input_mode not in NET2_INPUT_MODES:
            raise HCError(f"unknown cascade input_mode {input_mode!r}; expected one of {NET2_INPUT_MODES}")
        if downsample_mode not in ("area", "trilinear"):
            raise HCError(f"unknown downsample_mode {downsample_mode!r}; expected 'area' or 'trilinear'")
        if net1.num_classes != net2.num_classes:
            raise HCError(f"Net1 has {net1.num_classes} classes but Net2 has {net2.num_classes}")
        if net1.config["in_channels"] != image_channels:
            raise HCError(f"Net1 takes {net1.config['in_channels']} channels, image has {image_channels}")
        want = net2_input_channels(input_mode, net1.num_classes, image_channels)
        if net2.config["in_channels"] != want:
            raise HCError(
                f"Net2 takes {net2.config['in_channels']} channels but input_mode {input_mode!r} gives {want}"
            )
        self.net1 = net1
        self.net2 = net2
        self.input_mode = input_mode
        self.image_channels = image_channels
        self.num_classes = net1.num_classes
        self.scale_factors = tuple(float(f) for f in scale_factors) if scale_factors is not None else None
        self.downsample_mode = downsample_mode
        self._trainable = {"net1": True, "net2": True}

    # -- training-mode control -------------------------------------------------------------------
    def set_trainable(self, net1: bool, net2: bool) -> None:
        """Choose which sub-network learns: step 3 = (True, True), step 4 = (False, True).

        Frozen parts get ``requires_grad=False`` and stay in eval mode (no dropout) even when
        ``.train()`` is called; a frozen Net1 also runs under ``no_grad`` to save memory.
        """
        self._trainable = {"net1": bool(net1), "net2": bool(net2)}
        for name, flag in self._trainable.items():
            for p in getattr(self, name).parameters():
                p.requires_grad_(flag)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Cascade":
        """Like ``nn.Module.train`` but frozen sub-networks always stay in eval mode."""
        super().train(mode)
        for name, flag in self._trainable.items():
            if not flag:
                getattr(self, name).eval()
        return self

    @property
    def net1_trainable(self) -> bool:
        return self._trainable["net1"]

    @property
    def net2_trainable(self) -> bool:
        return self._trainable["net2"]

    # -- the two stages ---------------------------------------------------------------------------
    def run_net1(
        self, image: torch.Tensor, scale_factors: Optional[Sequence[float]] = None
    ) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int, int]]:
        """Downsample ``image`` to Net1's grid, pad to 16, run Net1; returns (logits cropped, grid, padded grid)."""
        factors = scale_factors if scale_factors is not None else self.scale_factors
        if factors is None:
            raise HCError("Cascade needs coarse scale factors (constructor or forward argument)")
        coarse = coarse_shape_for(image.shape[2:], factors)
        if self.downsample_mode == "area":
            small = F.interpolate(image, size=coarse, mode="area")
        else:
            small = F.interpolate(image, size=coarse, mode="trilinear", align_corners=False)
        padded = pad_to_multiple(small, self.net1.required_divisor)
        if self.net1_trainable:
            logits = self.net1(padded)
        else:
            with torch.no_grad():
                logits = self.net1(padded)
        return crop_to_shape(logits, coarse), coarse, tuple(padded.shape[2:])  # type: ignore[return-value]

    def upsample_probs(self, net1_logits: torch.Tensor, full_shape: Sequence[int]) -> torch.Tensor:
        """Softmax on the coarse grid, then trilinear to ``full_shape`` (stays a distribution per voxel)."""
        probs = torch.softmax(net1_logits.float(), dim=1)
        return F.interpolate(probs, size=tuple(full_shape), mode="trilinear", align_corners=False)

    def net2_input(self, image: torch.Tensor, net1_probs: torch.Tensor) -> torch.Tensor:
        """Concatenate the image with Net1's full-resolution output in the configured form."""
        if self.input_mode == "probabilities":
            extra = net1_probs
        else:
            labels = net1_probs.argmax(dim=1, keepdim=True).to(net1_probs.dtype)
            extra = labels / max(self.num_classes - 1, 1)
        return torch.cat([image.to(extra.dtype), extra], dim=1)

    def forward(self, image: torch.Tensor, scale_factors: Optional[Sequence[float]] = None) -> CascadeOutput:
        """Run the cascade on a full-resolution subvolume (N, Cimg, D, H, W) with D >= K."""
        if image.dim() != 5 or image.shape[1] != self.image_channels:
            raise HCError(
                f"cascade input must be (N, {self.image_channels}, D, H, W), got {tuple(image.shape)}"
            )
        net1_logits, coarse, padded = self.run_net1(image, scale_factors)
        probs = self.upsample_probs(net1_logits, image.shape[2:])
        net2_logits = self.net2(self.net2_input(image, probs))
        return CascadeOutput(net1_logits, coarse, padded, probs, net2_logits)
