"""Eager argument checks: every message names the argument, the value, the fix."""

from __future__ import annotations

import numbers
from typing import Any, Sequence


def _is_concrete_number(value: Any) -> bool:
  # Hyperparameters may arrive traced (optax.inject_hyperparams); those are
  # checked by the caller that made them, not here.
  return isinstance(value, numbers.Number) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be a positive int, got {value!r} "
                    f"({type(value).__name__}).")
  if value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value}.")


def choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; "
                     f"got {value!r}.")


def in_range(name: str, value: Any, low: float, high: float, *,
             closed_high: bool = False) -> None:
  """Checks ``low <= value < high`` (or ``<= high``) for concrete numbers."""
  if not _is_concrete_number(value):
    return
  ok = low <= value <= high if closed_high else low <= value < high
  if not ok:
    bracket = "]" if closed_high else ")"
    raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}.")


def non_negative(name: str, value: Any) -> None:
  if _is_concrete_number(value) and value < 0:
    raise ValueError(f"{name} must be >= 0, got {value}.")
