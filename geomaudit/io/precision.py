"""fp64 that is fp64 (issue 9, item 5).

transformers computes some modules in float32 whatever the model's dtype: Llama's RMSNorm casts its input
to float32, the eager attention of Llama, ViT and others takes its softmax in float32, rotary embeddings
build their angles in float32, and the heads' own losses cast logits to float32. In a float64 model that caps
``--precision fp64`` at float32 accuracy, and a fully masked row (left padding) becomes ``-inf`` everywhere in
float32 and a NaN out of the softmax.

``KeepFloat64`` is a torch function mode under which every float32, float16 or bfloat16 dtype that model code
asks for (``x.to(torch.float32)``, ``x.float()``, ``softmax(..., dtype=torch.float32)``, a factory's
``dtype=``) is float64 instead, and tensors created without a dtype are float64 (the default dtype). It
changes no module's code and needs no table of patches: it acts on what any module asks torch for. Constants a
model computed when it was built (RoPE frequencies) keep the values they were built with.

What still returns a lower-precision float under it (a tensor made from numpy, a kernel's own output) is found
by ``float32_modules``: one forward pass, each such op attributed to the innermost module running it.
"""

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

LOW = (torch.float32, torch.float16, torch.bfloat16)
_LOWERING = {Tensor.float, Tensor.half, Tensor.bfloat16}


def _up(value):
    return torch.float64 if isinstance(value, torch.dtype) and value in LOW else value


def _low(out) -> bool:
    return isinstance(out, Tensor) and out.is_floating_point() and out.dtype != torch.float64


class KeepFloat64(TorchFunctionMode):
    """Within it, model code computes in float64 where it asked for a lower precision (see the module doc).

    ``on_low(func)``, when given, is called for every op that still returned a lower-precision float.
    """

    def __init__(self, on_low: Callable[[object], None] | None = None):
        super().__init__()
        self.on_low = on_low

    def __enter__(self):
        self._default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.set_default_dtype(self._default)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _LOWERING:
            func = Tensor.double
        out = func(*map(_up, args), **{k: _up(v) for k, v in (kwargs or {}).items()})
        if self.on_low is not None and _low(out):
            self.on_low(func)
        return out


def is_float64(model: nn.Module) -> bool:
    """Whether ``model``'s floating-point parameters are float64 (an fp64 audit)."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return first is not None and first.dtype == torch.float64


def float32_modules(model: nn.Module, loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor],
                    batch: Mapping[str, Tensor]) -> list[str]:
    """The modules of ``model`` in which an op returned a float of less than 64 bits during ``loss_fn(model,
    batch)`` under ``KeepFloat64``: ``name (Class)``, in the order they first did so; the loss computed
    outside every module is ``(loss)``."""
    names = {m: name for name, m in model.named_modules()}
    stack: list[str] = []
    found: dict[str, None] = {}

    def enter(module, args):
        stack.append(f"{names[module] or 'the model'} ({type(module).__name__})")

    def leave(module, args, output):
        stack.pop()

    hooks = [h for m in names for h in (m.register_forward_pre_hook(enter),
                                         m.register_forward_hook(leave, always_call=True))]
    try:
        with torch.no_grad(), KeepFloat64(lambda func: found.setdefault(stack[-1] if stack else "(loss)")):
            loss_fn(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return list(found)
