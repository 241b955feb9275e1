"""Build the networks from the plans -- the one place where plans become modules.

Training and inference both call these functions, so a checkpoint's ``networks`` state dicts always fit
the modules rebuilt from its ``plans`` (documentation/conventions.md, "Trained model folders").

The plans' field layout is spelled out once, in :mod:`heartcascade.planning.plans` (``net1_kwargs``,
``net2_kwargs``, ``cascade_kwargs``, ``baseline_kwargs``; sections ``net1``, ``net2``,
``baseline_unet``; see documentation/plans.md); this module turns those into modules and checks that
Net2's input channels match its input mode.
"""
from __future__ import annotations

from typing import Any

from heartcascade.networks.baseline_unet import BaselineUNet3D
from heartcascade.networks.cascade import Cascade
from heartcascade.networks.net1 import Net1
from heartcascade.networks.net2 import Net2, net2_input_channels
from heartcascade.planning import plans as P
from heartcascade.utils.errors import HCError

def build_net1(plans: P.Plans) -> Net1:
    kw = P.net1_kwargs(plans)
    kw["dilations"] = [d if isinstance(d, int) else tuple(d) for d in kw["dilations"]]
    return Net1(**kw)


def build_net2(plans: P.Plans) -> Net2:
    p = plans
    kw = P.net2_kwargs(p)
    want = net2_input_channels(p.net2.input_mode, p.num_classes, p.num_input_channels)
    if kw["in_channels"] != want:
        raise HCError(f"plans: net2.in_channels is {kw['in_channels']} but input_mode "
                      f"{p.net2.input_mode!r} with {p.num_input_channels} image channel(s) and "
                      f"{p.num_classes} classes needs {want}")
    return Net2(**kw)


def build_cascade(plans: P.Plans, net1: Net1 | None = None, net2: Net2 | None = None) -> Cascade:
    """Net1 + Net2 as one module (existing sub-networks may be passed in, e.g. loaded ones).

    No default scale factors: they are per case (``properties['coarse_scale_factors']``) and are
    passed to ``forward`` / ``run_net1``.
    """
    return Cascade(net1 if net1 is not None else build_net1(plans),
                   net2 if net2 is not None else build_net2(plans), **P.cascade_kwargs(plans))


def build_baseline(plans: P.Plans) -> BaselineUNet3D:
    return BaselineUNet3D(**P.baseline_kwargs(plans))


#: Each configuration's networks, keyed as in checkpoints.
NETWORKS = {"cascade": lambda p: {"net1": build_net1(p), "net2": build_net2(p)},
            "baseline": lambda p: {"baseline": build_baseline(p)}}


def build_networks(configuration: str, plans: P.Plans) -> dict[str, Any]:
    """``{"net1", "net2"}`` for ``"cascade"``, ``{"baseline"}`` for ``"baseline"`` (checkpoint keys)."""
    if configuration not in NETWORKS:
        raise HCError(f"unknown configuration {configuration!r}; expected 'cascade' or 'baseline'")
    return NETWORKS[configuration](plans)
