"""Piggyback: adapt one frozen pretrained network to many tasks with learned binary masks."""

__version__ = "0.1.0"
