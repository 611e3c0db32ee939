"""Errors the user sees: one line that says what to fix, the traceback in a log file.

``UserError`` is a mistake in the job, its files or its model that the user can
fix; its message names the job key, the file, the row or the field. Errors
raised inside Ray tasks and actors reach the driver wrapped (``RayTaskError``,
``ActorDiedError`` whose cause is the actor's constructor, Ray Data's
``UserCodeException``); ``root_cause`` unwraps them, and ``one_line`` words the
root as a single line. ``write_log`` puts the full traceback in
``<output>/logs/<timestamp>.log`` (a temporary folder when the output is remote,
not writable or not there yet).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

MAX_LINE = 400


class UserError(ValueError):
    """A bad job, input file or model: the message names the key, file, row or field to fix."""


def _ray_wrappers() -> tuple[type, ...]:
    """Ray's exception types that wrap another exception (empty when Ray was never imported)."""
    if "ray" not in sys.modules:
        return ()
    from ray.exceptions import RayActorError, RayTaskError, UserCodeException

    return (RayTaskError, RayActorError, UserCodeException)


def _inner(err: BaseException) -> BaseException | None:
    """The exception ``err`` wraps, when it is a Ray wrapper that still holds it (else None).

    A ``RayTaskError`` holds the task's exception as ``cause``. An ``ActorDiedError``
    holds only the text of its constructor's error (its ``__cause__`` is Ray Data's
    internal ``SystemException``): it is a root, read by ``one_line``.
    """
    wrappers = _ray_wrappers()
    if not wrappers:
        return None
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(err, RayTaskError):
        cause = getattr(err, "cause", None)
        return cause if isinstance(cause, BaseException) and cause is not err else None
    if isinstance(err, RayActorError):
        return None
    if isinstance(err, wrappers):
        return err.__cause__
    return None


def chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it wraps, outermost first."""
    out = [err]
    while True:
        inner = _inner(out[-1])
        if inner is None or any(inner is e for e in out):
            return out
        out.append(inner)


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception behind Ray's wrappers (``err`` itself when it is not wrapped)."""
    return chain(err)[-1]


def _under(path: str, output: str) -> bool:
    out = output.removeprefix("file://").rstrip("/")
    return str(path) == out or str(path).startswith(out + "/")


# Errors whose message is already the one line a user reads (it names the file, row, field or key): no type name.
PLAIN_ERRORS = ("UserError", "ConfigError", "ShardError", "ValueError", "StageFailed")

_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.+)$")


def _from_traceback_text(text: str) -> str | None:
    """``Type: message`` of the last exception named in a traceback's text (Ray keeps only the text of some)."""
    found = None
    for line in text.splitlines():
        match = _RAISED.match(line.strip())
        if match and not match.group(1).startswith("ray."):
            found = match
    if found is None:
        return None
    name, message = found.group(1).rsplit(".", 1)[-1], found.group(2)
    return message if name in PLAIN_ERRORS else f"{name}: {message}"


def one_line(err: BaseException, output: str | None = None) -> str:
    """The root cause as one line: its message (with its type name when it is not a plain user error).

    ``output`` is the job's ``data.output``: a permission error under it says the output is not writable.
    """
    wrapped = chain(err)
    root = wrapped[-1]
    if isinstance(root, PermissionError) and output and root.filename and _under(root.filename, output):
        return f"data.output '{output}' is not writable ({root.strerror or 'permission denied'}: {root.filename})"
    if _is_ray_wrapper(root):  # the exception itself did not survive the trip to the driver: its text did
        for e in reversed(wrapped):
            found = _from_traceback_text(str(e))
            if found is not None:
                return _cut(found)
    text = str(root).strip()
    if isinstance(root, OSError) and root.strerror and root.filename:  # "[Errno 13] ...: '/x'" -> "...: /x"
        text = f"{root.strerror}: {root.filename}"
    if (isinstance(root, (UserError, OSError, ValueError, TypeError)) or type(root).__name__ in PLAIN_ERRORS) and text:
        first = text.splitlines()[0]
    else:
        first = f"{type(root).__name__}: {text.splitlines()[0]}" if text else type(root).__name__
    if isinstance(root, OSError) and root.filename and str(root.filename) not in first:
        first = f"{first} ({root.filename})"
    return _cut(first)


def _cut(line: str) -> str:
    return line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."


def _is_ray_wrapper(err: BaseException) -> bool:
    return isinstance(err, _ray_wrappers())


def log_folder(output: str | None) -> Path:
    """``<output>/logs`` for a local, writable output folder that exists; else a folder under the system's
    temp folder (a job that fails before it wrote anything, e.g. on a mistyped path, leaves no output folder)."""
    if output and ("://" not in output or output.startswith("file://")) and \
            Path(output.removeprefix("file://")).is_dir():
        folder = Path(output.removeprefix("file://")) / "logs"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            pass
    folder = Path(tempfile.gettempdir()) / "influence-logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_log(err: BaseException, output: str | None, command: list[str]) -> Path:
    """Write ``err``'s full traceback (and that of its root cause) to a new log file; returns its path."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    path = log_folder(output) / f"{stamp}.log"
    text = [f"command: {' '.join(command)}", f"time: {stamp}", "",
            "".join(traceback.format_exception(type(err), err, err.__traceback__))]
    root = root_cause(err)
    if root is not err:
        text += ["", "root cause:", "".join(traceback.format_exception(type(root), root, root.__traceback__))]
    path.write_text("\n".join(text))
    return path
