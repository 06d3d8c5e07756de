"""The real forward's layer outputs, kept for the meta-gradient's forward-mode product.

The product u = J_theta f_theta(X) . t (online_step.py) runs the model forward again with dual tensors, at the
parameters, on the inputs and with the random state of the real step's forward, so every layer's primal output is
the real forward's. Forward-mode AD computes each primal a second time, and then its tangent: the primal is about
half of the product (on LeNet-5 its tanh and average pooling cost more than its convolutions). `kept_layer_outputs`
keeps the outputs of the layers in `TANGENTS` during the real forward; inside `reusing(kept)` those layers return them
as the primal and compute only the tangent, from the kept output y, the input's primal x and tangent dx and their
parameters' tangents:

    linear, convolution             d(W * x + b) = dW * x + db + W * dx
    tanh, sigmoid                   dy = f'(x) dx, with f' written in y: 1 - y^2, y (1 - y)
    average pooling, flatten, identity (linear maps A)   dy = A dx

These are the tangents forward-mode AD computes for real values, in the same operations. The table holds the layers
whose primal costs more to compute again than to keep: ReLU is one cheap pass over an output as large as its input,
and keeping it doubled the kept memory on All-CNN-C for no time (docs/benchmarks.md). Outputs are kept as the layer's
forward returned them, before its forward hooks, which the product runs again; under a global forward hook nothing is
kept. The i-th call of a layer in the product takes the i-th call's output in the real forward; a call is computed in
full, as forward-mode AD does, where that call kept nothing (keyword arguments, not one floating-point tensor in and
out), its kept output was changed in place since (an in-place activation after the layer), or its input is shaped
otherwise. A product that calls a kept layer more or less often than the real forward (a forward that branches on
grad mode, say) is run again without kept outputs (online_step.model_jvp). Everything else (batch norm, dropout,
max pooling, ReLU, layer subclasses, the functional operations between modules) runs under forward-mode AD as before.
Like the replayed random state, this relies on the model's forward being a function of its parameters, buffers,
inputs and random state.
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize


class KeptOutput(NamedTuple):
    output: torch.Tensor  # detached: shares the version counter of the real forward's output
    version: int  # the output's version when kept
    input_shape: torch.Size


class KeptOutputs:
    """Per kept layer, its calls in the real forward in order: the output, or None for a call that kept nothing (with
    keyword arguments, or not from one floating-point tensor to one). A pass that reuses them consumes them;
    `matched` says whether it called every layer exactly as often as the real forward did."""

    def __init__(self) -> None:
        self.calls: dict[nn.Module, deque[KeptOutput | None]] = {}
        self.overrun = False  # a layer was called more often than in the real forward

    @property
    def matched(self) -> bool:
        return not self.overrun and not any(self.calls.values())


Tangent = Callable[[nn.Module, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor | None]


def affine_tangent(layer: nn.Module, x: torch.Tensor, dx: torch.Tensor | None, _: torch.Tensor) -> torch.Tensor | None:
    """dW * x + db + W * dx for `nn.Linear` and `nn.ConvNd`, whose parameters may be dual or not."""
    apply = F.linear if type(layer) is nn.Linear else layer._conv_forward
    weight, d_weight = forward_ad.unpack_dual(layer.weight)
    d_bias = None if layer.bias is None else forward_ad.unpack_dual(layer.bias).tangent
    if d_weight is None and d_bias is not None:  # a frozen weight with a trained bias
        d_weight = torch.zeros_like(weight)
    tangent = None if d_weight is None else apply(x, d_weight, d_bias)
    if dx is None:
        return tangent
    return apply(dx, weight, None) if tangent is None else tangent.add_(apply(dx, weight, None))


def linear_map_tangent(
    layer: nn.Module, _: torch.Tensor, dx: torch.Tensor | None, __: torch.Tensor
) -> torch.Tensor | None:
    """A dx for a parameter-free linear layer A (the class's forward: the instance's is `tangent_forward`)."""
    return None if dx is None else type(layer).forward(layer, dx)


def from_output(derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Tangent:
    """An elementwise activation's tangent f'(x) dx, by `derivative(dx, y)`: autograd's own formula in the output."""
    return lambda _, __, dx, y: None if dx is None else derivative(dx, y)


TANGENTS: dict[type[nn.Module], Tangent] = {
    **dict.fromkeys((nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d), affine_tangent),
    **dict.fromkeys((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                     nn.AdaptiveAvgPool3d, nn.Flatten, nn.Identity), linear_map_tangent),
    nn.Tanh: from_output(torch.ops.aten.tanh_backward),
    nn.Sigmoid: from_output(torch.ops.aten.sigmoid_backward),
}


def keepable_layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers of exactly a type in `TANGENTS` (a subclass may compute something else), neither
    parametrized nor with a forward of their own set on the instance; none under a global forward hook (it runs before
    a layer's own hooks, so the kept output would be the hook's)."""
    if getattr(torch.nn.modules.module, "_global_forward_hooks", None):
        return []
    return [layer for layer in model.modules() if type(layer) in TANGENTS and not parametrize.is_parametrized(layer)
            and "forward" not in vars(layer)]


@contextlib.contextmanager
def kept_layer_outputs(model: nn.Module) -> Iterator[KeptOutputs]:
    """Keep the outputs of the model's layers in `TANGENTS` while the block runs (the real forward), each as its
    forward returned it: before the layer's other forward hooks, which the product runs again."""
    kept = KeptOutputs()

    def keep(layer: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        fits = (len(args) == 1 and not kwargs and torch.is_tensor(args[0]) and torch.is_tensor(output)
                and output.is_floating_point())  # the tangents are written for real values
        entry = KeptOutput(output.detach(), output._version, args[0].shape) if fits else None
        kept.calls.setdefault(layer, deque()).append(entry)

    handles = [layer.register_forward_hook(keep, prepend=True, with_kwargs=True) for layer in keepable_layers(model)]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def tangent_forward(kept: KeptOutputs, layer: nn.Module, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """The layer's kept output of the matching call as the primal, with its tangent (module docstring); the layer's
    own forward under forward-mode AD where the call kept nothing or its output does not fit."""
    calls = kept.calls[layer]
    kept.overrun |= not calls
    entry = calls.popleft() if calls else None
    fits = entry is not None and len(args) == 1 and not kwargs and torch.is_tensor(args[0])
    if not fits or entry.output._version != entry.version or args[0].shape != entry.input_shape:
        return type(layer).forward(layer, *args, **kwargs)
    x, dx = forward_ad.unpack_dual(args[0])
    tangent = TANGENTS[type(layer)](layer, x, dx, entry.output)
    return entry.output if tangent is None else forward_ad.make_dual(entry.output, tangent)


@contextlib.contextmanager
def reusing(kept: KeptOutputs) -> Iterator[None]:
    """Within a forward-mode pass at the kept forward's parameters, inputs and random state: the kept layers return
    their kept outputs with the tangent only (module docstring). The kept outputs are consumed; check
    `kept.matched` after the pass."""
    for layer in kept.calls:
        layer.forward = functools.partial(tangent_forward, kept, layer)
    try:
        yield
    finally:
        for layer in kept.calls:
            del layer.forward
