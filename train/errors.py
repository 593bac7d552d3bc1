"""User-input errors: what the command line prints as one line and exit status 2.

Raise `UserError` for anything the user can fix (a config field, a data file,
the mesh, a checkpoint): its message names the field and the fix. The CLI
(`python -m train`) prints `error: <message>` without a traceback and exits
with status 2; `--verbose` shows the traceback. `UserError` is a `ValueError`,
so code that catches `ValueError` keeps working.

Example:

  from train import errors

  if cfg.steps < 1:
    raise errors.UserError(f"steps must be a positive int, got {cfg.steps!r}")
"""

from collections.abc import Callable
from typing import Any

EXIT_STATUS = 2  # what the CLI exits with on a UserError (as argparse does)


class UserError(ValueError):
  """Bad user input; the message is one line naming the field and the fix."""


class MissingFileError(UserError, FileNotFoundError):
  """A file the user named does not exist."""


def gather(*checks: Callable[[], Any]) -> list[Any]:
  """Runs independent checks and reports every failure at once.

  Args:
    *checks: Callables that raise `ValueError` (or `UserError`) on bad input.

  Returns:
    What each check returned, in order (a check may build what it checks).

  Raises:
    UserError: the messages of all failed checks, joined by "; ".

  Example:
    *_, tx = errors.gather(lambda: validate(cfg),
                           lambda: optimizers.validate(cfg.opt, model_cfg, steps))
  """
  problems, results = [], []
  for check in checks:
    try:
      results.append(check())
    except ValueError as e:
      problems.extend(getattr(e, "problems", None) or [_one_line(e)])
  if len(problems) == 1:
    raise UserError(problems[0])
  if problems:
    error = UserError(f"{len(problems)} problems: " + "; ".join(problems))
    error.problems = problems  # a gather of gathers lists each problem once
    raise error
  return results


def _one_line(error: BaseException) -> str:
  """The message of `error` on one line (FileNotFoundError's too)."""
  text = str(error) if error.args else type(error).__name__
  return " ".join(text.split())
