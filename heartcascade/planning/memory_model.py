"""Memory model of the real networks: predicted peak memory of a training step or an inference pass.

How it works. The actual network classes (Net1, Net2, Cascade, BaselineUNet3D) are instantiated on
PyTorch's ``meta`` device, where tensors have shapes but no storage, so a forward + loss + backward of
a full-size batch costs milliseconds whatever the size. A ``TorchDispatchMode`` sees every aten op of
that pass -- forward, loss and autograd's backward -- and keeps a ledger of live tensor *storages*
(allocated when an op returns a new storage, freed when the storage is garbage-collected, e.g. when
autograd releases a saved activation). The ledger's maximum is the peak an ideal allocator would reach.
On top of it:

* static memory: parameters, Adam's two moment buffers (for trainable parameters) and the input batch;
* the optimizer step (after backward, when activations are gone): parameters + gradients + Adam state
  + the temporaries of ``torch.optim.Adam`` (one parameter-sized buffer with CUDA's foreach kernels);
* backend workspaces per convolution (``backend='cpu'``: oneDNN's channel-blocked copies and per-thread
  weight-gradient buffers, calibrated on this project's CPU measurements; ``backend='cuda'``: none --
  cuDNN picks workspace-free algorithms when memory is short; the planner keeps a safety margin).

The estimate is checked against measured peaks with :func:`measure_training_peak` (CPU: the profiler's
allocation trace; CUDA: ``torch.cuda.max_memory_allocated``); tests/test_planning.py asserts +-25% on
CPU and ``scripts/benchmark_preprocessing.py --memory-check`` can be run on a GPU.

All sizes are bytes; fp32 training (no AMP) is assumed.
"""
from __future__ import annotations

import json
import math
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from heartcascade.networks.baseline_unet import BaselineUNet3D
from heartcascade.networks.cascade import Cascade, coarse_shape_for
from heartcascade.networks.net1 import Net1
from heartcascade.networks.net2 import Net2

GiB = 1024 ** 3
_CPU_CHANNEL_BLOCK = 16  # oneDNN (AVX-512) pads channels to blocks of 16 in its internal layouts
_CPU_WEIGHT_GRAD_COPIES = 4  # weight-sized scratch buffers oneDNN allocates in convolution backward


@dataclass
class MemoryEstimate:
    """Predicted memory of one training step (or inference pass), bytes."""

    parameters: int
    gradients: int
    optimizer_state: int
    inputs: int
    activations_peak: int  # peak of everything allocated during forward/backward (incl. gradients)
    optimizer_step_peak: int  # peak during optimizer.step (static + grads + temporaries)
    peak: int

    @property
    def peak_gb(self) -> float:
        return self.peak / GiB

    def to_dict(self) -> dict[str, float]:
        return {k: round(v / GiB, 4) for k, v in asdict(self).items()}


class _Ledger(TorchDispatchMode):
    """Tracks live tensor storages created by ops run under it (see module docstring)."""

    def __init__(self, backend: str = "cuda") -> None:
        super().__init__()
        self.backend = backend
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return 0
        nbytes = int(storage.nbytes())
        self.live[key] = nbytes
        self.current += nbytes
        weakref.finalize(storage, self._release, key)
        return nbytes

    def _workspace(self, func, args, out) -> int:
        if self.backend != "cpu":
            return 0
        name = getattr(func, "__name__", str(func))
        if name.startswith("convolution_backward"):
            grad_out, inp, weight = args[0], args[1], args[2]
            transposed = bool(args[7]) if len(args) > 7 else False
            if not _cpu_uses_mkldnn(inp, weight, args[9] if len(args) > 9 else 1):
                return _im2col_bytes(inp, weight, grad_out, transposed)
            grad_in = out[0] if isinstance(out, (tuple, list)) and out[0] is not None else None
            extra = _CPU_WEIGHT_GRAD_COPIES * weight.numel() * weight.element_size()
            if grad_in is not None:
                extra += _blocked_bytes(grad_in) - grad_in.numel() * grad_in.element_size()
            return extra
        if name.startswith("convolution"):
            inp, weight = args[0], args[1]
            transposed = bool(args[6]) if len(args) > 6 else False
            if not _cpu_uses_mkldnn(inp, weight, args[8] if len(args) > 8 else 1):
                return _im2col_bytes(inp, weight, out, transposed)
            return _blocked_bytes(out)
        return 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        # outputs and the op's scratch space coexist while it runs
        self.peak = max(self.peak, self.current + self._workspace(func, args, out))
        return out


def _cpu_uses_mkldnn(inp: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> bool:
    """PyTorch's CPU choice between oneDNN and its native im2col convolution (fp32, >1 thread), after
    ``ConvParams::use_mkldnn`` in aten/src/ATen/native/Convolution.cpp."""
    n = inp.shape[0]
    return bool(int(groups) > 1 or (weight.shape[-1] > 3 and weight.shape[-2] > 3) or n > 1
                or n * inp.shape[1] * inp.shape[2] * inp.shape[3] > 20480)


def _im2col_bytes(inp: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, transposed: bool) -> int:
    """Column buffer of the native (im2col) 3D convolution for one sample."""
    k = math.prod(weight.shape[2:])
    if transposed:  # columns: (C_out * k) x input voxels
        return int(weight.shape[1] * k * math.prod(inp.shape[2:]) * inp.element_size())
    return int(inp.shape[1] * k * math.prod(out.shape[2:]) * inp.element_size())


def _blocked_bytes(t: torch.Tensor) -> int:
    """Bytes of a (N, C, ...) tensor with C padded to oneDNN's channel block."""
    if t.dim() < 2:
        return t.numel() * t.element_size()
    c = t.shape[1]
    padded = int(math.ceil(c / _CPU_CHANNEL_BLOCK) * _CPU_CHANNEL_BLOCK)
    return t.numel() // max(c, 1) * padded * t.element_size()


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A multi-class soft Dice (softmax, one-hot target) -- stands in for the paper's losses, which have
    the same memory footprint (a few logits-sized tensors)."""
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - (2.0 * inter / denom.clamp_min(1e-5)).mean()


def _adam_step_temporaries(params: Sequence[torch.Tensor], backend: str) -> int:
    if not params:
        return 0
    if backend == "cuda":  # foreach implementation: one sqrt(exp_avg_sq) list, like the parameters
        return _nbytes(params)
    return 2 * max(p.numel() * p.element_size() for p in params)


def simulate(model: nn.Module, inputs: Sequence[torch.Tensor], loss_fn: Callable[[Any], torch.Tensor] | None,
             backend: str = "cuda", optimizer: str = "adam") -> MemoryEstimate:
    """Predict the peak of one training step (``loss_fn`` given) or one no-grad forward (``loss_fn=None``).

    ``model`` and ``inputs`` must live on the meta device; ``loss_fn`` maps the model output to a scalar
    (it may close over meta target tensors, which are then counted with ``inputs``).
    """
    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    p_bytes = _nbytes(params)
    t_bytes = _nbytes(trainable)
    training = loss_fn is not None
    state = 2 * t_bytes if training and optimizer == "adam" else 0
    in_bytes = _nbytes(inputs) + (getattr(loss_fn, "target_bytes", 0) if training else 0)
    for p in params:
        p.grad = None
    ledger = _Ledger(backend)
    with ledger:
        if training:
            out = model(*inputs)
            loss = loss_fn(out)
            del out
            loss.backward()
            del loss
        else:
            with torch.no_grad():
                out = model(*inputs)
                del out
    act_peak = ledger.peak
    static = p_bytes + state + in_bytes
    step_peak = 0
    if training:
        step_peak = static + t_bytes + _adam_step_temporaries(trainable, backend)
    for p in params:
        p.grad = None
    return MemoryEstimate(parameters=p_bytes, gradients=t_bytes if training else 0, optimizer_state=state,
                          inputs=in_bytes, activations_peak=act_peak, optimizer_step_peak=step_peak,
                          peak=max(static + act_peak, step_peak))


class _Loss:
    """Sum of soft Dice losses of selected outputs against meta targets (remembers target bytes)."""

    def __init__(self, targets: Sequence[torch.Tensor], pick: Callable[[Any], Sequence[torch.Tensor]]) -> None:
        self.targets = list(targets)
        self.pick = pick
        self.target_bytes = _nbytes(self.targets)

    def __call__(self, out: Any) -> torch.Tensor:
        logits = self.pick(out)
        total = None
        for lg, tg in zip(logits, self.targets):
            term = soft_dice_loss(lg, tg)
            total = term if total is None else total + term
        return total


# ---------------------------------------------------------------------------------------------------
# The networks of heartcascade (the real modules, traced on the meta device)
# ---------------------------------------------------------------------------------------------------

_MODELS: dict[str, nn.Module] = {}


def _meta(build: Callable[[], nn.Module], key: str | None = None) -> nn.Module:
    """Build a module on the meta device; with ``key`` reuse an earlier one (building dominates the cost)."""
    if key is not None and key in _MODELS:
        return _MODELS[key]
    with torch.device("meta"):
        model = build()
    if key is not None:
        if len(_MODELS) > 256:
            _MODELS.clear()
        _MODELS[key] = model
    return model


def _cache_key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def net1_memory(net1_kwargs: dict[str, Any], batch: int, shape: Sequence[int], training: bool = True,
                backend: str = "cuda") -> MemoryEstimate:
    """Net1 on (batch, C, *shape) coarse voxels (each side a multiple of 16)."""
    model = _meta(lambda: Net1(**net1_kwargs), _cache_key("net1", net1_kwargs))
    model.train(training)
    with torch.device("meta"):
        x = torch.empty((batch, net1_kwargs["in_channels"]) + tuple(shape))
        target = torch.empty((batch,) + tuple(shape), dtype=torch.uint8)
    loss = _Loss([target], lambda out: [out]) if training else None
    return simulate(model, [x], loss, backend)


def net2_memory(net2_kwargs: dict[str, Any], batch: int, shape: Sequence[int], training: bool = True,
                backend: str = "cuda") -> MemoryEstimate:
    """Net2 alone on (batch, Cin, D, H, W) (D >= K; H, W multiples of 2**num_levels); output D-K+1 slices."""
    model = _meta(lambda: Net2(**net2_kwargs), _cache_key("net2", net2_kwargs))
    model.train(training)
    d, h, w = (int(s) for s in shape)
    with torch.device("meta"):
        x = torch.empty((batch, net2_kwargs["in_channels"], d, h, w))
        target = torch.empty((batch, d - net2_kwargs["K"] + 1, h, w), dtype=torch.uint8)
    loss = _Loss([target], lambda out: [out]) if training else None
    return simulate(model, [x], loss, backend)


def largest_fitting(peak: Callable[[int], int], budget: float, upper: int) -> int:
    """Largest ``n`` in ``[1, upper]`` with ``peak(n) <= budget`` (``peak`` grows with ``n``; 1 when even
    that does not fit): the planner's z-chunk (rule 10) and the predictor's per-window chunk."""
    upper = max(1, int(upper))
    if peak(upper) <= budget:
        return upper
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def net2_inference_peak(net2_kwargs: dict[str, Any], chunk: int, window_hw: Sequence[int],
                        backend: str = "cuda") -> int:
    """Peak bytes of one no-grad Net2 pass producing ``chunk`` output slices on an (H, W) window."""
    shape = (int(chunk) + int(net2_kwargs["K"]) - 1, int(window_hw[0]), int(window_hw[1]))
    return net2_memory(net2_kwargs, 1, shape, training=False, backend=backend).peak


def cascade_memory(net1_kwargs: dict[str, Any], net2_kwargs: dict[str, Any], input_mode: str, batch: int,
                   shape: Sequence[int], scale_factors: Sequence[float], train_net1: bool = True,
                   backend: str = "cuda") -> MemoryEstimate:
    """The end-to-end cascade (networks.cascade.Cascade) on a full-res subvolume (batch, C, D, H, W).

    Loss: L1 on Net1's coarse output (when Net1 trains) + L2 on Net2's centre slices.
    """
    channels = int(net1_kwargs["in_channels"])
    model = _meta(lambda: Cascade(Net1(**net1_kwargs), Net2(**net2_kwargs), input_mode=input_mode,
                                  image_channels=channels), _cache_key("cascade", net1_kwargs, net2_kwargs, input_mode))
    model.scale_factors = tuple(float(f) for f in scale_factors)
    model.set_trainable(train_net1, True)
    model.train(True)
    d, h, w = (int(s) for s in shape)
    coarse = coarse_shape_for((d, h, w), scale_factors)
    with torch.device("meta"):
        x = torch.empty((batch, channels, d, h, w))
        t2 = torch.empty((batch, d - net2_kwargs["K"] + 1, h, w), dtype=torch.uint8)
        t1 = torch.empty((batch,) + tuple(coarse), dtype=torch.uint8)
    if train_net1:
        loss = _Loss([t1, t2], lambda out: [out.net1_logits, out.net2_logits])
    else:
        loss = _Loss([t2], lambda out: [out.net2_logits])
    return simulate(model, [x], loss, backend)


def baseline_memory(baseline_kwargs: dict[str, Any], batch: int, shape: Sequence[int], training: bool = True,
                    backend: str = "cuda") -> MemoryEstimate:
    """The plain 3D U-Net baseline on (batch, C, *shape)."""
    model = _meta(lambda: BaselineUNet3D(**baseline_kwargs), _cache_key("baseline", baseline_kwargs))
    model.train(training)
    with torch.device("meta"):
        x = torch.empty((batch, baseline_kwargs["in_channels"]) + tuple(shape))
        target = torch.empty((batch,) + tuple(shape), dtype=torch.uint8)
    loss = _Loss([target], lambda out: [out]) if training else None
    return simulate(model, [x], loss, backend)


# ---------------------------------------------------------------------------------------------------
# Measurement (to check the model): the same training step, run for real
# ---------------------------------------------------------------------------------------------------

def measure_training_peak(build: Callable[[], nn.Module], inputs: Callable[[torch.device], Sequence[torch.Tensor]],
                          loss_fn: Callable[[Any, torch.device], torch.Tensor], device: str | torch.device = "cpu",
                          lr: float = 1e-4) -> int:
    """Measured peak bytes of one Adam training step, comparable to :func:`simulate`'s ``peak``.

    Adam's state exists before the measured step (as from the second iteration on). CUDA: ``torch.cuda.max_memory_allocated``
    (everything the caching allocator handed out: parameters, state, inputs, activations, workspaces).
    CPU: bytes of parameters + Adam state + inputs (already allocated) plus the peak of the profiler's
    allocation trace during the step (``profile_memory=True``; every CPU allocation/free is recorded).
    """
    device = torch.device(device)
    model = build().to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = [t.to(device) for t in inputs(device)]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(*x), device)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        step()  # warm-up: creates Adam's state, cuDNN picks its algorithms
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    # CPU: create Adam's state as its first step would (so the measured step is a steady-state one) and
    # measure that single step -- a warm-up step only costs time here (oneDNN kernel generation).
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    static = _nbytes(list(model.parameters())) + state + _nbytes(x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return static + peak


def check_net1(net1_kwargs: dict[str, Any], batch: int, shape: Sequence[int], device: str = "cpu") -> dict[str, float]:
    """Predicted vs measured peak of a Net1 training step on ``device`` (for tests and the GPU benchmark)."""
    backend = "cuda" if str(device).startswith("cuda") else "cpu"
    predicted = net1_memory(net1_kwargs, batch, shape, True, backend).peak
    c = net1_kwargs["in_channels"]
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, net1_kwargs["num_classes"], (batch,) + tuple(shape), generator=gen, dtype=torch.uint8)
    measured = measure_training_peak(
        lambda: Net1(**net1_kwargs),
        lambda dev: [torch.randn((batch, c) + tuple(shape), generator=gen)],
        lambda out, dev: soft_dice_loss(out, target.to(dev)), device)
    return {"predicted_gb": predicted / GiB, "measured_gb": measured / GiB, "ratio": predicted / measured}


def check_net2(net2_kwargs: dict[str, Any], batch: int, shape: Sequence[int], device: str = "cpu") -> dict[str, float]:
    """Predicted vs measured peak of a Net2 training step on ``device``."""
    backend = "cuda" if str(device).startswith("cuda") else "cpu"
    predicted = net2_memory(net2_kwargs, batch, shape, True, backend).peak
    d, h, w = shape
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, net2_kwargs["num_classes"], (batch, d - net2_kwargs["K"] + 1, h, w), generator=gen,
                           dtype=torch.uint8)
    measured = measure_training_peak(
        lambda: Net2(**net2_kwargs),
        lambda dev: [torch.randn((batch, net2_kwargs["in_channels"], d, h, w), generator=gen)],
        lambda out, dev: soft_dice_loss(out, target.to(dev)), device)
    return {"predicted_gb": predicted / GiB, "measured_gb": measured / GiB, "ratio": predicted / measured}


def check_cascade(net1_kwargs: dict[str, Any], net2_kwargs: dict[str, Any], input_mode: str, batch: int,
                  shape: Sequence[int], scale_factors: Sequence[float], device: str = "cpu") -> dict[str, float]:
    """Predicted vs measured peak of an end-to-end cascade training step (step 3) on ``device``."""
    backend = "cuda" if str(device).startswith("cuda") else "cpu"
    predicted = cascade_memory(net1_kwargs, net2_kwargs, input_mode, batch, shape, scale_factors, True, backend).peak
    d, h, w = shape
    ncls = net1_kwargs["num_classes"]
    gen = torch.Generator().manual_seed(0)
    coarse = coarse_shape_for(shape, scale_factors)
    t1 = torch.randint(0, ncls, (batch,) + tuple(coarse), generator=gen, dtype=torch.uint8)
    t2 = torch.randint(0, ncls, (batch, d - net2_kwargs["K"] + 1, h, w), generator=gen, dtype=torch.uint8)
    c = net1_kwargs["in_channels"]
    measured = measure_training_peak(
        lambda: Cascade(Net1(**net1_kwargs), Net2(**net2_kwargs), input_mode=input_mode, image_channels=c,
                        scale_factors=scale_factors),
        lambda dev: [torch.randn((batch, c, d, h, w), generator=gen)],
        lambda out, dev: soft_dice_loss(out.net1_logits, t1.to(dev)) + soft_dice_loss(out.net2_logits, t2.to(dev)),
        device)
    return {"predicted_gb": predicted / GiB, "measured_gb": measured / GiB, "ratio": predicted / measured}
