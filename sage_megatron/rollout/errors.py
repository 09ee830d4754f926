"""Errors of the rollout pool, and one-line renderings of the exceptions Ray wraps."""
from __future__ import annotations


class RolloutEngineError(RuntimeError):
    """An engine kept failing, or a request kept failing, or an update left weights undefined."""


class StaleWeightsError(RuntimeError):
    """On-policy generation was asked for weights newer than some engine holds."""


def short_error(exc: BaseException, limit: int = 400) -> str:
    """One line for an exception; a Ray task error is replaced by the exception it wraps."""
    for _ in range(5):
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError(...).cause
        if not isinstance(cause, BaseException):
            break
        exc = cause
    text = f"{type(exc).__name__}: {exc}".replace("\n", " | ")
    return text if len(text) <= limit else text[:limit] + " ..."
