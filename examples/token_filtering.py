"""Token filtering in your own training loop: only kept tokens count in the loss, and the backward runs on
those rows only. ``python examples/token_filtering.py`` (a few seconds on a CPU).

A tiny random-init Llama stands in for your model: any Hugging Face llama / mistral / qwen2 / qwen3 causal LM
works the same way.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import centrifuge
from centrifuge.tokens import selectors

torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
model = LlamaForCausalLM(config).train()
ids = torch.randint(0, 128, (2, 32))
labels = ids.clone()
keep = torch.rand(2, 32) < 0.5  # e.g. from precomputed reference losses, label masks, a random draw

# --- readme: token-filtering ---
model = centrifuge.apply(model)                   # patches the forward; weights untouched
out = model(input_ids=ids, labels=labels, keep_mask=keep)        # keep [B, T] bool, known before the forward
out.loss.backward()                               # the backward runs on the kept tokens only
picked = model(input_ids=ids, labels=labels, select=selectors.self_loss(0.5, scope="batch"))  # chosen after
picked.loss.backward()                            # top 50% of the current per-token losses
centrifuge.revert(model)                          # the original forward again
# --- /readme ---

print(f"known before: loss {out.loss.item():.4f} over {out.num_counted} of {out.num_labelled} labelled tokens")
print(f"chosen after: loss {picked.loss.item():.4f} over {picked.num_counted} of {picked.num_labelled}")
