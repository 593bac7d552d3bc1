"""The documentation is true: its code runs, its links resolve, its map is whole.

* Every fenced block of the README, docs/ and bench/README.md runs, unless
  the line before it is ``<!-- check: skip: REASON -->``: the Python blocks
  of a page one after the other in one process (a page reads as a session),
  each Bash block from the repository root.
* Relative links point at files that exist.
* docs/architecture.md lists every module of subspax/, configs/, train/ and
  bench/, and no package imports from a floor above its own.
* No module reaches into another's private names.
"""

import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(
    ["README.md", os.path.join("bench", "README.md")]
    + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
       if f.endswith(".md")])
SKIP = re.compile(r"<!-- check: skip: (.+?) -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
PACKAGES = ("subspax", "configs", "train", "bench")  # floors, bottom first


def _read(path: str) -> str:
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    return f.read()


def blocks(text: str) -> list[tuple[str, str, str | None]]:
  """``(language, code, skip reason or None)`` of each fenced block."""
  out = []
  for match in FENCE.finditer(text):
    before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
    skip = SKIP.fullmatch(before.strip())
    out.append((match.group(1), match.group(2),
                skip.group(1) if skip else None))
  return out


def _env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
  # A block's bare ``python`` is the interpreter that runs the tests.
  env["PATH"] = os.pathsep.join(
      p for p in (os.path.dirname(sys.executable), env.get("PATH")) if p)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env


def _run(args, timeout=600):
  result = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)
  assert result.returncode == 0, (
      f"{args[:2]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
      f"{result.stderr[-3000:]}")
  return result


def test_blocks_are_found_with_their_markers():
  text = textwrap.dedent("""\
      ```bash
      echo run
      ```
      <!-- check: skip: minutes -->
      ```python
      print("skipped")
      ```
      """)
  assert blocks(text) == [("bash", "echo run\n", None),
                          ("python", 'print("skipped")\n', "minutes")]


@pytest.mark.parametrize("page", PAGES)
def test_every_block_is_bash_or_python_or_skipped(page):
  for language, code, skip in blocks(_read(page)):
    assert skip or language in ("bash", "python"), (
        f"{page}: a {language or 'plain'} block without a skip marker:\n{code}")


@pytest.mark.parametrize("page", [p for p in PAGES if any(
    lang == "python" and not skip for lang, _, skip in blocks(_read(p)))])
def test_python_blocks_run(page, tmp_path):
  code = "\n".join(code for lang, code, skip in blocks(_read(page))
                   if lang == "python" and not skip)
  script = tmp_path / "page.py"
  script.write_text(code)
  _run([sys.executable, str(script)])


BASH = [pytest.param(page, i, code, id=f"{page}:{i}")
        for page in PAGES
        for i, (lang, code, skip) in enumerate(blocks(_read(page)))
        if lang == "bash" and not skip]


@pytest.mark.slow
@pytest.mark.parametrize("page,index,code", BASH)
def test_bash_blocks_run(page, index, code):
  del page, index
  if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")):
    pytest.skip("no .venv here: the commands use .venv/bin/python "
                "(bash scripts/run_tests.sh makes it)")
  _run(["bash", "-euo", "pipefail", "-c", code])


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
  base = os.path.dirname(page)
  for target in re.findall(r"\]\(([^)\s]+)\)", _read(page)):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue
    path = os.path.normpath(os.path.join(base, target.split("#")[0]))
    assert os.path.exists(os.path.join(ROOT, path)), f"{page}: {target}"


def _modules(package: str) -> list[str]:
  return sorted(f for f in os.listdir(os.path.join(ROOT, package))
                if f.endswith(".py"))


def test_architecture_lists_every_module():
  text = _read(os.path.join("docs", "architecture.md"))
  sections = dict(re.findall(r"^## (\w+)/\n(.*?)(?=^## |\Z)", text,
                             re.S | re.M))
  for package in PACKAGES:
    assert package in sections, f"architecture.md has no '## {package}/'"
    missing = [m for m in _modules(package)
               if f"`{m}`" not in sections[package]]
    assert not missing, f"docs/architecture.md, {package}/ lacks {missing}"


def _imports(path: str) -> set[str]:
  """Top-level names of the packages a file imports."""
  names = set()
  for node in ast.walk(ast.parse(_read(path))):
    if isinstance(node, ast.Import):
      names |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module.split(".")[0])
  return names


@pytest.mark.parametrize("floor,package", list(enumerate(PACKAGES)))
def test_no_package_imports_from_a_floor_above(floor, package):
  above = set(PACKAGES[floor + 1:])
  for module in _modules(package):
    wrong = _imports(os.path.join(package, module)) & above
    assert not wrong, f"{package}/{module} imports {sorted(wrong)}"


def _private_uses(path: str) -> list[str]:
  """Private names of another module this file uses: ``from subspax import
  _x`` outside subspax/, and ``module._x`` attributes of subspax modules."""
  tree = ast.parse(_read(path))
  own = path.split(os.sep)[0]
  modules, uses = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module in PACKAGES:
      for alias in node.names:
        if alias.name.startswith("_") and node.module != own:
          uses.append(f"{node.module}.{alias.name}")
        modules.add(alias.asname or alias.name)
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in modules and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      uses.append(f"{node.value.id}.{node.attr}")
  return sorted(set(uses))


@pytest.mark.parametrize("path", [os.path.join(p, m) for p in PACKAGES
                                  for m in _modules(p)])
def test_modules_use_only_public_names_of_other_modules(path):
  assert _private_uses(path) == []


@pytest.mark.slow
def test_run_tests_runs_only_the_file_it_is_given():
  if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")):
    pytest.skip("no .venv here (bash scripts/run_tests.sh makes it)")
  out = _run(["bash", "scripts/run_tests.sh", "--collect-only", "-n", "0",
              "tests/test_rank_warning.py"]).stdout
  assert "test_rank_warning.py" in out
  assert "test_cli.py" not in out and "subspax/_core.py" not in out
