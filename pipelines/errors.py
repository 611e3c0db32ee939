"""Errors the user sees: one line that says what to fix, the traceback in a log file.

``UserError`` is a mistake in the job, its files or its model that the user can
fix; its message names the job key, the file, the row or the field. Errors
raised inside Ray tasks and actors reach the driver wrapped (``RayTaskError``,
``ActorDiedError`` whose cause is the actor's constructor, Ray Data's
``UserCodeException``); ``root_cause`` unwraps them, and ``one_line`` words the
root as a single line. ``write_log`` puts the full traceback in
``<output>/logs/<timestamp>.log`` (a temporary folder when the output is remote
or not writable).
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import traceback
from pathlib import Path

MAX_LINE = 400


class UserError(ValueError):
    """A bad job, input file or model: the message names the key, file, row or field to fix."""


def _ray_wrappers() -> tuple[type, ...]:
    try:
        from ray.exceptions import RayActorError, RayTaskError
    except ImportError:
        return ()
    out: list[type] = [RayTaskError, RayActorError]
    try:
        from ray.exceptions import UserCodeException

        out.append(UserCodeException)
    except ImportError:
        pass
    try:
        from ray.data.exceptions import UserCodeException as DataUserCodeException

        out.append(DataUserCodeException)
    except ImportError:
        pass
    return tuple(out)


def _inner(err: BaseException) -> BaseException | None:
    """The exception ``err`` wraps, when it is a Ray wrapper (else None)."""
    import sys

    if "ray" not in sys.modules:
        return None
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(err, RayTaskError):
        cause = getattr(err, "cause", None)
        return cause if isinstance(cause, BaseException) and cause is not err else err.__cause__
    if isinstance(err, RayActorError):
        # an actor whose constructor raised: Ray keeps the constructor's RayTaskError
        for attr in ("_creation_task_error", "creation_task_error", "cause"):
            cause = getattr(err, attr, None)
            if isinstance(cause, BaseException) and cause is not err:
                return cause
        return err.__cause__
    if isinstance(err, _ray_wrappers()):
        return err.__cause__
    return None


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception behind Ray's wrappers (``err`` itself when it is not wrapped)."""
    seen = {id(err)}
    while True:
        inner = _inner(err)
        if inner is None or id(inner) in seen:
            return err
        seen.add(id(inner))
        err = inner


def _under(path: str, output: str) -> bool:
    out = output.removeprefix("file://").rstrip("/")
    return str(path) == out or str(path).startswith(out + "/")


def one_line(err: BaseException, output: str | None = None) -> str:
    """The root cause as one line: its message (with its type name when it is not a plain user error).

    ``output`` is the job's ``data.output``: a permission error under it says the output is not writable.
    """
    root = root_cause(err)
    if isinstance(root, PermissionError) and output and root.filename and _under(root.filename, output):
        return f"data.output '{output}' is not writable ({root.strerror or 'permission denied'}: {root.filename})"
    text = str(root).strip()
    if isinstance(root, (UserError, FileNotFoundError, PermissionError, ValueError, TypeError, KeyError)) and text:
        first = text.splitlines()[0]
    else:
        first = f"{type(root).__name__}: {text.splitlines()[0]}" if text else type(root).__name__
    if isinstance(root, OSError) and root.filename and str(root.filename) not in first:
        first = f"{first} ({root.filename})"
    return first if len(first) <= MAX_LINE else first[:MAX_LINE - 3] + "..."


def log_folder(output: str | None) -> Path:
    """``<output>/logs`` for a local, writable output; else a folder under the system's temp folder."""
    if output and ("://" not in output or output.startswith("file://")):
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
