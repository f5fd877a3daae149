"""Which modules (or parameters) are layers, and their forward order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

GRANULARITIES = ("module", "parameter")
ROOT_NAME = "(root)"


@dataclass(frozen=True)
class Layer:
    """A unit that statistics are reported for.

    Attributes:
        name: qualified module name (``granularity="module"``) or parameter name.
        module_name: qualified name of the module that owns the parameters.
        params: the trainable parameters of the layer, in registration order.
        is_weight_layer: whether it owns a parameter of 2 or more dimensions (Linear, Conv,
            recurrent weights), i.e. takes part in the depth profile. Embeddings are excluded:
            their gradients are sparse lookups, not a signal passed along depth.
    """

    name: str
    module_name: str
    params: tuple[nn.Parameter, ...]
    is_weight_layer: bool


def _owned_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def discover_layers(model: nn.Module, granularity: str) -> list[Layer]:
    """List the layers of ``model`` in registration order.

    With ``"module"`` a layer is each module that directly owns trainable parameters; with
    ``"parameter"`` each trainable parameter tensor. A parameter shared by several modules
    (tied weights) belongs to the first module that registers it.
    """
    seen: set[int] = set()
    layers: list[Layer] = []
    for mod_name, module in model.named_modules():
        owned = [(n, p) for n, p in _owned_trainable(module) if id(p) not in seen]
        if not owned:
            continue
        seen.update(id(p) for _, p in owned)
        weight_like = not isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        label = mod_name or ROOT_NAME
        if granularity == "module":
            layers.append(
                Layer(
                    name=label,
                    module_name=mod_name,
                    params=tuple(p for _, p in owned),
                    is_weight_layer=weight_like and any(p.dim() >= 2 for _, p in owned),
                )
            )
        else:
            for pname, p in owned:
                layers.append(
                    Layer(
                        name=f"{mod_name}.{pname}" if mod_name else pname,
                        module_name=mod_name,
                        params=(p,),
                        is_weight_layer=weight_like and p.dim() >= 2,
                    )
                )
    return layers


def is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller (``False`` on torch < 2.3)."""
    fn = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(fn()) if fn is not None else False


class ForwardOrderRecorder:
    """Records the order in which modules first run, with forward pre-hooks.

    :meth:`finish` (gradwatch calls it at its first step) removes the hooks of the modules that
    ran eagerly, so they cost nothing afterwards. Under ``torch.compile`` the hooks are traced:
    there they record the order once, *at trace time* (``torch.compiler.assume_constant_result``),
    and add nothing to the compiled graph and no guard on gradwatch's state. Their handles are kept
    until :meth:`remove` (at ``close()``), because dynamo guards on the number of hooks of each
    module: removing them at the first step would recompile the model.
    """

    def __init__(self, model: nn.Module) -> None:
        self._order: dict[str, int] = {}
        self._compiled: set[str] = set()
        self._done = False
        self._handles: dict[str, RemovableHandle] = {}
        for name, module in model.named_modules():
            owns = any(True for _ in module.parameters(recurse=False))
            if owns or not any(True for _ in module.children()):
                self._handles[name] = module.register_forward_pre_hook(self._make_hook(name))

    def _make_hook(self, name: str):
        order, compiled = self._order, self._compiled

        def seen_eagerly() -> None:
            if name not in order and not self._done:
                order[name] = len(order)

        def seen_by_compiler() -> int:
            # Runs in Python while dynamo traces the forward; the traced graph holds only the result.
            if name not in order and not self._done:
                order[name] = len(order)
            compiled.add(name)
            return 0

        # What torch.compiler.assume_constant_result(fn) does, without importing dynamo (seconds)
        # into every run that never compiles.
        seen_by_compiler._dynamo_marked_constant = True  # type: ignore[attr-defined]
        traced = seen_by_compiler

        def hook(module: nn.Module, args: object) -> None:
            if is_compiling():
                traced()
            else:
                seen_eagerly()

        return hook

    @property
    def order(self) -> dict[str, int]:
        """Module name -> index of its first call (modules that ran so far)."""
        return dict(self._order)

    @property
    def active(self) -> bool:
        """Whether the order is still being recorded (:meth:`finish` not called yet)."""
        return not self._done

    def finish(self, layers: list[Layer]) -> list[Layer]:
        """Stop recording, remove the hooks of eager modules and return ``layers`` in forward order.

        Layers whose module never ran keep their registration order, after those that ran.
        """
        self._done = True
        for name in [n for n in self._handles if n not in self._compiled]:
            self._handles.pop(name).remove()
        n = len(layers)
        indexed = list(enumerate(layers))
        indexed.sort(key=lambda il: (self._order.get(il[1].module_name, n + il[0]), il[0]))
        return [layer for _, layer in indexed]

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        self._done = True
        for h in self._handles.values():
            h.remove()
        self._handles.clear()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module doing the work behind wrappers: ``torch.compile``'s ``OptimizedModule``,
    ``DistributedDataParallel`` and ``DataParallel`` (in any nesting), else ``model``.

    The wrappers call the original module, whose hooks and parameters are the real ones; watching
    it keeps the layer names free of the ``_orig_mod.`` and ``module.`` prefixes, so a compiled or
    DDP run reports the same names as a plain one.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def numel(layer: Layer) -> int:
    """Total number of elements in the layer's parameters."""
    return sum(p.numel() for p in layer.params)


