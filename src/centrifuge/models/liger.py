"""Liger-Kernel, both ways: recognise a Liger-patched model, and patch one reversibly (the bench's baseline).

Liger-Kernel (``liger_kernel.transformers``) patches a Hugging Face model in two ways:

* **class patch** (``apply_liger_kernel_to_llama()`` before the model is built): the modeling module's names
  are rebound — ``LlamaRMSNorm = LigerRMSNorm``, ``LlamaMLP = LigerSwiGLUMLP`` (which has no ``act_fn``),
  ``apply_rotary_pos_emb = liger_rotary_pos_emb`` (which expects [B, H, T, D] tensors), and
  ``LlamaForCausalLM.forward = lce_forward`` (fused linear cross-entropy);
* **instance patch** (``apply_liger_kernel_to_llama(model=m)``, ``_apply_liger_kernel_to_instance``, what HF
  ``Trainer(use_liger_kernel=True)`` calls when ``train()`` starts): the same module-level rebinding, plus
  ``forward`` (and ``extra_repr`` / ``_get_name``) bound on the model and on every norm and MLP instance.

Centrifuge's token-sparse layer does not run those modules' forwards: it computes RMSNorm, RoPE and SwiGLU
itself (``centrifuge.ops.elementwise``: torch formulas, or our Triton kernels on CUDA). So a
Liger-patched module is accepted where it computes exactly the formula of the module it replaced
(``centrifuge.ops.liger``: ``is_liger_rms_norm``, ``is_liger_swiglu``, ``is_liger_rope``). The model's own
(Liger) forward keeps serving calls without ``keep_mask`` / ``select``.

``LigerDense`` applies Liger's kernels to one instance and undoes them exactly (module globals and instance
attributes restored), which Liger itself cannot; ``centrifuge bench``'s ``dense_liger`` uses it.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch.nn as nn

from centrifuge.ops.liger import forward_of, from_liger, is_liger_rope


def liger_available() -> str | None:
    """None when ``liger_kernel.transformers`` imports, else why not."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as err:  # ImportError, or a Triton / torch mismatch at import
        return f"liger-kernel is not importable ({type(err).__name__}: {err}); pip install liger-kernel"
    return None


def liger_patches(model: nn.Module) -> list[str]:
    """What Liger has patched on ``model`` (empty when nothing): "forward", "rms_norm", "swiglu", "rope"."""
    found = []
    if from_liger(getattr(model, "forward", None)):
        found.append("forward")
    inner = getattr(model, "model", None)
    layers = list(getattr(inner, "layers", []) or [])
    if any(from_liger(forward_of(m)) for layer in layers
           for m in (layer.input_layernorm, layer.post_attention_layernorm)):
        found.append("rms_norm")
    if any(from_liger(forward_of(layer.mlp)) for layer in layers):
        found.append("swiglu")
    module = _modeling_module(model)
    if module is not None and is_liger_rope(getattr(module, "apply_rotary_pos_emb", None)):
        found.append("rope")
    return found


def _modeling_module(model: nn.Module) -> types.ModuleType | None:
    try:
        return importlib.import_module(type(model).__module__)
    except Exception:
        return None


class LigerDense:
    """Liger-Kernel's kernels on one model instance (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy: what
    ``Trainer(use_liger_kernel=True)`` applies), undone exactly by ``revert``.

    Liger's instance patch also rebinds names in the model's modeling module (class-wide: later models of the
    family would be built with Liger modules); ``revert`` restores those too.
    """

    def __init__(self, model: nn.Module, **liger_kwargs: Any) -> None:
        why = liger_available()
        if why:
            raise RuntimeError(why)
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        self.model = model
        self._module = _modeling_module(model)
        self._module_vars = dict(vars(self._module)) if self._module is not None else {}
        self._instance_vars = {id(m): (m, dict(vars(m))) for m in model.modules()}
        _apply_liger_kernel_to_instance(model=model, **liger_kwargs)
        self.patched = liger_patches(model)

    def revert(self) -> None:
        """Restore the modeling module's names and every module's instance attributes as they were."""
        if self._module is not None:
            _restore_names(vars(self._module), self._module_vars, delete=lambda n: delattr(self._module, n),
                           assign=lambda n, v: setattr(self._module, n, v))
        for module, before in self._instance_vars.values():
            now = vars(module)
            _restore_names(now, before, delete=now.__delitem__, assign=now.__setitem__)


def _restore_names(now: dict[str, Any], before: dict[str, Any], *, delete: Callable[[str], None],
                   assign: Callable[[str, Any], None]) -> None:
    """Make the namespace ``now`` hold exactly ``before`` again: added names deleted, changed ones put back
    (through ``delete`` / ``assign``: ``setattr`` for modules, item assignment for instance ``__dict__``s)."""
    for name in [n for n in now if n not in before]:
        delete(name)
    for name, value in before.items():
        if now.get(name, _MISSING) is not value:
            assign(name, value)


_MISSING = object()


@contextlib.contextmanager
def modeling_names_restored() -> Iterator[None]:
    """Restore every loaded ``transformers.models.*`` module's names on exit.

    Liger's instance patch (``model.liger`` in ``centrifuge train``) also rebinds names in the family's
    modeling module (``LlamaRMSNorm``, ``apply_rotary_pos_emb``, ...), class-wide for the process; a process
    that runs several trainings one after another (a study's arms) wraps each in this so that the next model
    is built, and its RoPE looked up, unpatched."""
    modules = {name: module for name, module in list(sys.modules.items())
               if name.startswith("transformers.models.") and module is not None}
    before = {name: dict(vars(module)) for name, module in modules.items()}
    try:
        yield
    finally:
        for name, module in modules.items():
            _restore_names(vars(module), before[name], delete=lambda n, m=module: delattr(m, n),
                           assign=lambda n, v, m=module: setattr(m, n, v))
