"""Experiments run on top of the Centrifuge library (studies, not part of the installed package)."""
