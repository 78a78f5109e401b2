"""Gradio page of MRG Studio: layout (widgets) + handlers (plain functions over the engine)."""
from .layout import build_app, launch_kwargs

__all__ = ["build_app", "launch_kwargs"]
