"""``subspax.METHODS``: every method's ``<method>(learning_rate, ...)`` by name."""

from __future__ import annotations

import collections.abc
from typing import Callable, Iterator

import optax

from subspax import _apollo
from subspax import _methods

Factory = Callable[..., optax.GradientTransformation]


class MethodRegistry(collections.abc.Mapping):
  """The nine methods by name, read-only, in the order the tables list them.

  ``METHODS[name]`` is ``subspax.<name>``, the factory that takes
  ``learning_rate`` first. It is the one registry the trainer, its configs
  and the benchmarks read, so a method added here is trainable by name
  (``--config.opt.name=<name>``) and benchmarked. An unknown name raises a
  ``KeyError`` that lists the known ones.

  Attributes:
    galore: :func:`subspax.galore`.
    subtrack: :func:`subspax.subtrack`.
    grasswalk: :func:`subspax.grasswalk`.
    grassjump: :func:`subspax.grassjump`.
    rso: :func:`subspax.rso`.
    grass: :func:`subspax.grass`.
    fira: :func:`subspax.fira`.
    apollo: :func:`subspax.apollo`.
    apollo_mini: :func:`subspax.apollo_mini`.

  Examples:
    >>> import subspax
    >>> list(subspax.METHODS)[:3]
    ['galore', 'subtrack', 'grasswalk']
    >>> subspax.METHODS['subtrack'] is subspax.subtrack
    True
    >>> tx = subspax.METHODS['grass'](learning_rate=1e-3, rank=4)
  """

  __slots__ = ("_factories",)

  def __init__(self, *factories: Factory):
    self._factories = {f.__name__: f for f in factories}

  def __getitem__(self, name: str) -> Factory:
    try:
      return self._factories[name]
    except KeyError:
      raise KeyError(f"unknown method {name!r}; subspax.METHODS has "
                     f"{', '.join(self._factories)}.") from None

  def __iter__(self) -> Iterator[str]:
    return iter(self._factories)

  def __len__(self) -> int:
    return len(self._factories)

  def __repr__(self) -> str:
    return f"MethodRegistry({', '.join(self._factories)})"


METHODS = MethodRegistry(
    _methods.galore, _methods.subtrack, _methods.grasswalk,
    _methods.grassjump, _methods.rso, _methods.grass, _apollo.fira,
    _apollo.apollo, _apollo.apollo_mini)
