"""Networks of heartcascade: Net1 (coarse dilated 3D U-Net), Net2 (full-resolution slice network),
their cascade, and the plain 3D U-Net baseline. See ``documentation/architecture.md``."""
from heartcascade.networks.baseline_unet import BaselineUNet3D
from heartcascade.networks.blocks import (
    center_crop_depth,
    count_conv_layers,
    count_parameters,
    crop_to_shape,
    pad_to_multiple,
)
from heartcascade.networks.cascade import Cascade, CascadeOutput, coarse_shape_for, downsample_labels
from heartcascade.networks.net1 import DEFAULT_DILATIONS, PAPER_DILATIONS, Net1
from heartcascade.networks.net2 import NET2_INPUT_MODES, Net2, net2_input_channels, z_budget

__all__ = [
    "BaselineUNet3D",
    "Cascade",
    "CascadeOutput",
    "DEFAULT_DILATIONS",
    "NET2_INPUT_MODES",
    "Net1",
    "Net2",
    "PAPER_DILATIONS",
    "center_crop_depth",
    "coarse_shape_for",
    "count_conv_layers",
    "count_parameters",
    "crop_to_shape",
    "downsample_labels",
    "net2_input_channels",
    "pad_to_multiple",
    "z_budget",
]
