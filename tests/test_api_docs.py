"""The public API documents itself, and its signatures say what it accepts.

Every name in ``subspax.__all__``, every public function of
``subspax.reparam`` and every name of ``subspax.testing`` has a docstring with
a one-line summary, an ``Args:`` section naming each argument (or, for a
class, ``Attributes:`` naming each field) and an ``Examples:`` doctest. The
suite runs those doctests (``pytest --doctest-modules subspax``); these tests
check that they are there. The method factories are written out (a ``def`` of
their own name, so ``help()`` and ``grep`` find them), list every option in
their signature (``optax.inject_hyperparams`` reads it) and type each string
option with a ``Literal``.
"""

import ast
import collections.abc
import dataclasses
import inspect
import re
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspax
import subspax.ordering
import subspax.reparam
import subspax.testing

# Defined in modules whose docstrings are still to be written; flip to
# passing by removing the name once its docstring has Attributes and Examples.
PENDING = frozenset()
# Factories whose string options are still annotated ``str``.
PENDING_LITERALS = frozenset()

FACTORIES = sorted(
    name for name in subspax.__all__
    if name in subspax.METHODS or name.startswith("scale_by_"))


def _module_functions(module):
  return sorted(
      name for name, obj in vars(module).items()
      if not name.startswith("_") and inspect.isfunction(obj)
      and obj.__module__ == module.__name__)


def _params(cases, pending, reason):
  """``pytest.param`` per case; cases whose last entry is in ``pending``
  are strict xfails (they pass, and must be unmarked, once filled in)."""
  xfail = pytest.mark.xfail(strict=True, reason=reason)
  return [pytest.param(*case, marks=xfail) if case[-1] in pending
          else pytest.param(*case) for case in cases]


def _documented_names():
  cases = [("subspax", name) for name in subspax.__all__]
  cases += [("subspax.reparam", name)
            for name in _module_functions(subspax.reparam)]
  cases += [("subspax.ordering", name)
            for name in _module_functions(subspax.ordering)]
  cases += [("subspax.testing", name) for name in subspax.testing.__all__]
  return _params(cases, PENDING, "docstring pending")


def _section(doc: str, title: str) -> str:
  """The indented block under ``title:`` (empty when there is none)."""
  match = re.search(rf"^{title}:\n((?:[ \t]+.*\n|\n)*)", doc + "\n", re.M)
  return match.group(1) if match else ""


def _entries(block: str) -> set[str]:
  """Names introduced by ``name:`` at the block's own indentation."""
  lines = [line for line in block.splitlines() if line.strip()]
  if not lines:
    return set()
  depth = lambda line: len(line) - len(line.lstrip())
  indent = min(map(depth, lines))
  matches = [re.match(r"\s*(\*{0,2}\w+):", line) for line in lines
             if depth(line) == indent]
  return {m.group(1) for m in matches if m}


def _fields(obj) -> list[str]:
  """The documented fields of a class: NamedTuple / dataclass fields, else
  the public class attributes it declares."""
  if hasattr(obj, "_fields"):
    return list(obj._fields)
  if dataclasses.is_dataclass(obj):
    return [f.name for f in dataclasses.fields(obj)]
  return [name for name in vars(obj).get("__annotations__", {})
          if not name.startswith("_")]


def _parameters(fn) -> list[str]:
  names = []
  for p in inspect.signature(fn).parameters.values():
    if p.kind == p.VAR_KEYWORD:
      names.append("**" + p.name)
    elif p.kind == p.VAR_POSITIONAL:
      names.append("*" + p.name)
    else:
      names.append(p.name)
  return names


@pytest.mark.parametrize("module_name,name", _documented_names())
def test_public_name_has_summary_args_and_examples(module_name, name):
  obj = getattr(__import__(module_name, fromlist=["_"]), name)
  doc = inspect.getdoc(obj)
  assert doc, f"{module_name}.{name} has no docstring"
  summary = doc.splitlines()[0]
  assert summary.strip() and summary.rstrip().endswith("."), (
      f"{module_name}.{name}: the first line is not a one-line summary")
  examples = _section(doc, "Examples")
  assert ">>>" in examples, f"{module_name}.{name} has no Examples doctest"
  if isinstance(obj, types.ModuleType):
    return
  if inspect.isroutine(obj):
    documented = _entries(_section(doc, "Args"))
    missing = [p for p in _parameters(obj) if p not in documented]
    assert not missing, f"{module_name}.{name}: Args lacks {missing}"
    return
  cls = obj if inspect.isclass(obj) else type(obj)
  documented = _entries(_section(doc, "Attributes"))
  assert documented, f"{module_name}.{name} has no Attributes section"
  expected = (list(obj) if isinstance(obj, collections.abc.Mapping)
              else _fields(cls))
  missing = [f for f in expected if f not in documented]
  assert not missing, f"{module_name}.{name}: Attributes lacks {missing}"


@pytest.mark.parametrize("name", FACTORIES)
def test_factory_is_written_out_with_a_literal_docstring(name):
  """A ``def`` of its own name whose docstring is a literal (``help()``
  shows it), not a generated function or a concatenated string."""
  fn = getattr(subspax, name)
  source = inspect.getsource(fn)
  assert source.startswith(f"def {name}("), source.splitlines()[0]
  literal = ast.get_docstring(ast.parse(source).body[0])
  assert literal and literal == inspect.getdoc(fn)


@pytest.mark.parametrize("name", sorted(subspax.METHODS))
def test_method_signature_lists_every_option_of_its_scale_by(name):
  """``inspect.signature(<method>)`` (what ``optax.inject_hyperparams``
  reads) has every option of ``scale_by_<method>``, with its default."""
  method = inspect.signature(subspax.METHODS[name]).parameters
  scale_by = inspect.signature(getattr(subspax, "scale_by_" + name)).parameters
  assert list(method)[:5] == ["learning_rate", "rank", "update_interval",
                              "weight_decay", "mask"]
  for option, p in scale_by.items():
    assert option in method, f"{name} lacks {option}"
    assert method[option].kind == p.kind, option
    if (name, option) == ("rso", "prox_learning_rate"):
      assert method[option].default is None  # None: rso's own learning rate
    else:
      assert method[option].default == p.default, option


@pytest.mark.parametrize("name", _params(
    [(name,) for name in FACTORIES], PENDING_LITERALS, "Literal pending"))
def test_string_options_are_typed_with_literals(name):
  fn = getattr(subspax, name)
  hints = typing.get_type_hints(fn)
  for option, p in inspect.signature(fn).parameters.items():
    if isinstance(p.default, str):
      hint = hints[option]
      assert typing.get_origin(hint) is typing.Literal, (option, hint)
      assert p.default in typing.get_args(hint), (option, hint)


def test_methods_registry_is_read_only_and_names_its_methods():
  assert list(subspax.METHODS) == [
      "galore", "subtrack", "grasswalk", "grassjump", "rso", "grass", "fira",
      "apollo", "apollo_mini"]
  assert all(subspax.METHODS[n] is getattr(subspax, n) for n in subspax.METHODS)
  assert "adamw" not in subspax.METHODS
  with pytest.raises(KeyError, match="unknown method 'adamw'; .* galore"):
    subspax.METHODS["adamw"]
  with pytest.raises(TypeError):  # read-only
    subspax.METHODS["galore"] = None


def _run(tx, steps=3):
  params = {"w": jax.random.normal(jax.random.key(0), (8, 12))}
  state = tx.init(params)
  for i in range(steps):
    grads = jax.tree.map(lambda p: jnp.cos(p * (i + 1)), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params["w"]


def test_rso_under_inject_hyperparams_moves_its_displacement_with_its_lr():
  """``rso``'s proximal displacement follows its own learning rate also when
  ``inject_hyperparams`` fills in every default of the signature."""
  kwargs = dict(rank=2, update_interval=2, prox=1.0)
  injected = optax.inject_hyperparams(
      subspax.rso, static_args=("rank", "update_interval"))(
          learning_rate=0.1, **kwargs)
  direct = _run(subspax.rso(0.1, **kwargs))
  wrong_lr = _run(subspax.rso(0.1, prox_learning_rate=1.0, **kwargs))
  # float32 hyperparameters round differently from Python floats.
  np.testing.assert_allclose(_run(injected), direct, atol=1e-5)
  assert np.max(np.abs(wrong_lr - direct)) > 1e-3
