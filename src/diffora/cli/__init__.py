"""The ``diffora`` command line: ``app`` (parse and dispatch) -> ``options`` (every flag) -> ``loading`` (data,
model) -> ``commands`` (run/search/train/eval/ntk) -> ``outputs`` (the output folder)."""

from .app import main

__all__ = ["main"]
