"""Callbacks: evaluation reports and other training-time hooks."""

from callbacks.report import RetrievalReport

__all__ = ["RetrievalReport"]
