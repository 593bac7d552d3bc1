"""pyproject.toml's requirements and the constraints file CI installs with.

The library declares lower bounds only (it must install beside any newer jax);
`constraints/py311.txt` locks the versions the whole suite runs on.
"""

import os
import re
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = re.compile(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*?)\s*(#.*)?$")


def _name(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirements():
  """(group, name, version spec) of every requirement in pyproject.toml."""
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  groups = {"dependencies": project["dependencies"],
            **project["optional-dependencies"]}
  out = []
  for group, specs in groups.items():
    for spec in specs:
      name, _, version, _ = SPEC.match(spec).groups()
      if _name(name) != "subspax":
        out.append((group, _name(name), version))
  return out


def _locked():
  with open(os.path.join(REPO, "constraints", "py311.txt")) as f:
    lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  return {_name(line.split("==")[0]): line.split("==")[1] for line in lines}


def _version(text):
  return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_requirements_are_lower_bounds_not_pins():
  requirements = _requirements()
  assert {name for group, name, _ in requirements if group == "dependencies"} == {
      "jax", "optax", "numpy"}
  for group, name, version in requirements:
    assert version.startswith(">="), f"{group}: {name}{version} is not a lower bound"


def test_the_lock_pins_every_requirement_within_its_bound():
  locked = _locked()
  assert "subspax" not in locked
  for _, name, version in _requirements():
    assert name in locked, f"constraints/py311.txt does not pin {name}"
    assert _version(locked[name]) >= _version(version), (name, locked[name], version)


@pytest.mark.parametrize("package", ["subspax", "train"])
def test_chex_is_only_a_test_dependency(package):
  """Only the optional testing kit (subspax.testing, for users' own tests)
  imports chex; the library and the trainer do not."""
  for root, _, files in os.walk(os.path.join(REPO, package)):
    for file in files:
      if file.endswith(".py") and file != "testing.py":
        with open(os.path.join(root, file)) as f:
          assert not re.search(r"^\s*(import|from) chex\b", f.read(), re.M), file
