"""Centrifuge: token-sparse backward and neuron omission for Hugging Face decoder LLMs."""

__version__ = "0.1.0"
