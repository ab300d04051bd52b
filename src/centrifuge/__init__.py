"""Centrifuge: token-sparse backward and neuron omission for Hugging Face decoder LLMs.

    import centrifuge
    model = centrifuge.apply(model)                      # token-sparse backward ("fast")
    out = model(input_ids=ids, labels=labels, keep_mask=keep)   # or select=centrifuge.selectors.random(0.5)
    out.loss.backward()
    centrifuge.revert(model)
"""

from centrifuge.models.patch import apply, patch_mode, revert
from centrifuge.models.registry import REGISTRY, UnsupportedModelError
from centrifuge.tokens.forward import EmptySelectionError, TokenFilterOutput

__version__ = "0.1.0"
__all__ = ["apply", "revert", "patch_mode", "REGISTRY", "UnsupportedModelError", "EmptySelectionError",
           "TokenFilterOutput"]
