"""Centrifuge: token-sparse backward and neuron omission for Hugging Face decoder LLMs.

    import centrifuge
    model = centrifuge.apply(model)                      # token-sparse backward ("fast")
    out = model(input_ids=ids, labels=labels, keep_mask=keep)   # or select=selectors.self_loss(0.5)
    out.loss.backward()
    centrifuge.revert(model)
"""

import os

# torch's OpenMP threads busy-wait by default, which makes CPU training several times slower on small,
# shared machines; must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from centrifuge.models.patch import apply, patch_mode, revert  # noqa: E402
from centrifuge.models.registry import REGISTRY, UnsupportedModelError  # noqa: E402
from centrifuge.tokens.forward import EmptySelectionError, TokenFilterOutput  # noqa: E402

__version__ = "0.1.0"
__all__ = ["apply", "revert", "patch_mode", "REGISTRY", "UnsupportedModelError", "EmptySelectionError",
           "TokenFilterOutput"]
