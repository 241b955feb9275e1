"""One small runner per step ``input``: the loader, the trained module and ``forward(batch) -> outputs``.

The trainer's loop is generic: it asks the step's runner for a loader and a module, and each batch's
``forward`` returns ``{output: (logits, target)}`` for the loss table (:mod:`heartcascade.losses.terms`).
A new kind of batch is one new runner here, not a branch in the trainer. Runners are named after the
plans' ``training.steps[].input`` they serve.

=======================  ==========================================  =============
runner (plans input)     batches                                     outputs
=======================  ==========================================  =============
WholeCoarseVolumeRunner  whole coarse volumes (step 1)               net1
(whole_coarse_volume)
SubvolumesRunner         full-res subvolumes (steps 2-3)             net1 (+ net2)
(subvolumes)
SliceStacksRunner        K slices + frozen Net1 probabilities (4),   net2
(slice_stacks)           read at the drawn positions on the device
BaselineRunner           subvolumes on the baseline grid             out
=======================  ==========================================  =============
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from heartcascade.inference.upsampling import upsample_at_points
from heartcascade.losses.terms import LOSS_TERMS, loss_term
from heartcascade.networks.blocks import crop_to_shape, pad_to_multiple
from heartcascade.networks.cascade import downsample_labels
from heartcascade.planning.plans import BASELINE_STEP, Plans, StepPlan
from heartcascade.training.dataloading import CoarseVolumeLoader, SliceStackLoader, SubvolumeLoader, TrainCase
from heartcascade.utils.device import autocast
from heartcascade.utils.errors import HCError

Outputs = dict[str, tuple[torch.Tensor, torch.Tensor]]

#: The network outputs the batches of each step ``input`` produce (the losses of a step must read one of them);
#: the baseline's step has its own.
INPUT_OUTPUTS = {"whole_coarse_volume": ("net1",), "subvolumes": ("net1", "net2"), "slice_stacks": ("net2",),
                 BASELINE_STEP: ("out",)}


def check_losses(steps: dict[str, StepPlan]) -> None:
    """Each step's losses are in the loss table and read an output its batches produce (one-line HCError)."""
    for name, step in steps.items():
        where = "baseline_unet" if name == BASELINE_STEP else f"training.steps[{name}]"
        produced = INPUT_OUTPUTS[BASELINE_STEP if name == BASELINE_STEP else step.input]
        wrong = [n for n in step.losses if loss_term(n, f"plans: {where}.losses").output not in produced]
        if wrong:
            raise HCError(f"plans: {where}.losses {wrong} read an output this step does not produce "
                          f"(it produces {', '.join(produced)})")


@torch.no_grad()
def net1_coarse_probs(net1: nn.Module, coarse_image: np.ndarray, device: torch.device,
                      amp: str = "bf16") -> torch.Tensor:
    """Softmax of Net1 on a whole coarse volume (C, d, h, w), float32 on ``device`` (step 4's input)."""
    x = torch.from_numpy(np.array(coarse_image, dtype=np.float32)).to(device)[None]
    shape = x.shape[2:]
    with autocast(device, amp):
        logits = net1(pad_to_multiple(x, 16))
    return torch.softmax(crop_to_shape(logits, shape).float(), dim=1)[0]


def _net1_batched(cascade: nn.Module, x: torch.Tensor, factors: np.ndarray) -> list[torch.Tensor]:
    """Net1 logits per sample (each (1, C, *coarse_i)); samples sharing scale factors run together."""
    groups: dict[tuple[float, ...], list[int]] = {}
    for i, f in enumerate(factors):
        groups.setdefault(tuple(float(v) for v in f), []).append(i)
    out: list[torch.Tensor | None] = [None] * x.shape[0]
    for key, idx in groups.items():
        logits, _coarse, _padded = cascade.run_net1(x[idx], key)
        for j, i in enumerate(idx):
            out[i] = logits[j:j + 1]
    return out  # type: ignore[return-value]


def _flat_cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate (1, C, *spatial_i) tensors of different shapes as one (1, C, 1, 1, sum n_i) batch."""
    return torch.cat([t.reshape(1, t.shape[1], 1, 1, -1) for t in tensors], dim=4)


# Modules with one forward call per iteration, so DDP / torch.compile can wrap them.

class _Net1Whole(nn.Module):
    def __init__(self, net1: nn.Module) -> None:
        super().__init__()
        self.net1 = net1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net1(x)


class _Net1Sub(nn.Module):
    def __init__(self, cascade: nn.Module) -> None:
        super().__init__()
        self.cascade = cascade

    def forward(self, x: torch.Tensor, factors: np.ndarray) -> list[torch.Tensor]:
        return _net1_batched(self.cascade, x, factors)


class _CascadeStep(nn.Module):
    def __init__(self, cascade: nn.Module) -> None:
        super().__init__()
        self.cascade = cascade

    def forward(self, x: torch.Tensor, factors: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        net1_logits = _net1_batched(self.cascade, x, factors)
        probs = torch.cat([self.cascade.upsample_probs(l, x.shape[2:]) for l in net1_logits])
        return net1_logits, self.cascade.net2(self.cascade.net2_input(x, probs))


class _Net2Step(nn.Module):
    def __init__(self, cascade: nn.Module) -> None:
        super().__init__()
        self.cascade = cascade

    def forward(self, image: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return self.cascade.net2(self.cascade.net2_input(image, probs))


class StepRunner:
    """Base of the runners: ``module``, ``loader(cases, **common)``, ``forward(module, data, seg, batch)``."""

    def __init__(self, plans: Plans, step: StepPlan, networks: dict[str, nn.Module]) -> None:
        self.plans = plans
        self.step = step
        self.module = self.build_module(networks)

    def build_module(self, networks: dict[str, nn.Module]) -> nn.Module:
        raise NotImplementedError

    def loader(self, cases: list[TrainCase], **common: Any) -> Any:
        raise NotImplementedError

    def prepare(self, cases: list[TrainCase], device: torch.device, log: Callable[[str], None]) -> None:
        """Work needed once before the step's first batch (nothing for most kinds)."""

    def release(self, cases: list[TrainCase]) -> None:
        """Drop what :meth:`prepare` held."""

    def forward(self, module: nn.Module, data: torch.Tensor, seg: torch.Tensor, batch: dict[str, Any]) -> Outputs:
        raise NotImplementedError


class WholeCoarseVolumeRunner(StepRunner):
    """Step 1: Net1 on whole coarse volumes."""

    def build_module(self, networks: dict[str, nn.Module]) -> nn.Module:
        return _Net1Whole(networks["cascade"].net1)

    def loader(self, cases: list[TrainCase], **common: Any) -> Any:
        st = self.step
        return CoarseVolumeLoader(cases, divisor=self.plans.net1.required_divisor,
                                  max_shape=st.shapes[0] if st.shapes else None, **common)

    def forward(self, module: nn.Module, data: torch.Tensor, seg: torch.Tensor, batch: dict[str, Any]) -> Outputs:
        return {"net1": (module(data), seg)}


class SubvolumesRunner(StepRunner):
    """Steps 2-3: Net1 on downsampled subvolumes; with Net2 (trained or in a loss) the whole cascade."""

    def build_module(self, networks: dict[str, nn.Module]) -> nn.Module:
        cascade = networks["cascade"]
        with_net2 = "net2" in self.step.train or any(LOSS_TERMS[n].output == "net2" for n in self.step.losses)
        return _CascadeStep(cascade) if with_net2 else _Net1Sub(cascade)

    def loader(self, cases: list[TrainCase], **common: Any) -> Any:
        return SubvolumeLoader(cases, patch_shapes=self.step.shapes, **common)

    def forward(self, module: nn.Module, data: torch.Tensor, seg: torch.Tensor, batch: dict[str, Any]) -> Outputs:
        factors = np.asarray(batch["factors"], dtype=float)
        result = module(data, factors)
        net1_logits, net2_logits = result if isinstance(result, tuple) else (result, None)
        targets = [downsample_labels(seg[i:i + 1, 0], l.shape[2:]) for i, l in enumerate(net1_logits)]
        outputs = {"net1": (_flat_cat(net1_logits), _flat_cat([t[:, None] for t in targets]))}
        if net2_logits is not None:
            m = self.plans.net2.K // 2
            outputs["net2"] = (net2_logits, seg[:, :, m:seg.shape[2] - m])
        return outputs


class SliceStacksRunner(StepRunner):
    """Step 4: Net2 on K full slices with frozen Net1's probabilities, computed once per case.

    The probabilities stay on the training device (float16, each case's coarse grid); each batch reads
    them at the source positions its loader worker drew (:func:`upsample_at_points`), batched on the
    device instead of upsampled C channels at a time in the workers.
    """

    def build_module(self, networks: dict[str, nn.Module]) -> nn.Module:
        self.net1 = networks["cascade"].net1
        self.coarse_probs: list[torch.Tensor] | None = None
        self.full_shapes: list[tuple[int, int, int]] = []
        return _Net2Step(networks["cascade"])

    def loader(self, cases: list[TrainCase], **common: Any) -> Any:
        st = self.step
        return SliceStackLoader(cases, K=self.plans.net2.K, divisor=self.plans.net2.required_divisor,
                                tile=st.shapes[0][1:] if st.shapes else None, **common)

    def prepare(self, cases: list[TrainCase], device: torch.device, log: Callable[[str], None]) -> None:
        """Frozen Net1's softmax on each case's whole coarse volume: what Net2 sees at inference."""
        if self.coarse_probs is not None and len(self.coarse_probs) == len(cases):
            return
        t0 = time.perf_counter()
        was_training = self.net1.training
        self.net1.eval()
        self.coarse_probs = [net1_coarse_probs(self.net1, case.coarse_image, device, self.plans.amp).half()
                             for case in cases]
        self.full_shapes = [case.shape for case in cases]
        self.net1.train(was_training)
        log(f"step 4: frozen Net1 probabilities of {len(cases)} training cases computed "
            f"in {time.perf_counter() - t0:.1f}s")

    def release(self, cases: list[TrainCase]) -> None:
        self.coarse_probs = None
        self.full_shapes = []

    def forward(self, module: nn.Module, data: torch.Tensor, seg: torch.Tensor, batch: dict[str, Any]) -> Outputs:
        if self.coarse_probs is None:
            raise RuntimeError("step 4 needs prepare() (frozen Net1's probabilities) before its batches")
        nimg = self.plans.num_input_channels
        m = self.plans.net2.K // 2
        positions = data[:, nimg:nimg + 3]
        probs = torch.stack([upsample_at_points(self.coarse_probs[int(i)], self.full_shapes[int(i)], positions[b])
                             for b, i in enumerate(batch["case_index"])])
        return {"net2": (module(data[:, :nimg], probs), seg[:, :, m:m + 1])}


class BaselineRunner(StepRunner):
    """The 2 mm baseline U-Net on subvolumes of its grid."""

    def build_module(self, networks: dict[str, nn.Module]) -> nn.Module:
        return networks["baseline"]

    def loader(self, cases: list[TrainCase], **common: Any) -> Any:
        return SubvolumeLoader(cases, patch_shapes=self.step.shapes, **common)

    def forward(self, module: nn.Module, data: torch.Tensor, seg: torch.Tensor, batch: dict[str, Any]) -> Outputs:
        return {"out": (module(data), seg)}


@dataclass
class StepTraining:
    """What ``Trainer.train_step`` runs a step with (from ``Trainer.build_optimizer``)."""

    step: str
    runner: StepRunner
    module: nn.Module  # the runner's module, wrapped for DDP when distributed
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: Any


#: The cascade's runner of each step input (the baseline's single step has its own: training/models.py).
RUNNERS: dict[str, type[StepRunner]] = {"whole_coarse_volume": WholeCoarseVolumeRunner, "subvolumes": SubvolumesRunner,
                                        "slice_stacks": SliceStacksRunner}
