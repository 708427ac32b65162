"""Safe file-system writes: atomic text files, staging directories and publishing them in place.

Every directory the project writes (converted checkpoints, model directories, datasets) is built under a hidden
staging name next to its target and renamed into place when complete; an existing target is replaced only after
the new one is complete (`publish_directory`). Staging names carry the host and process id of their writer, so a
later run can tell a directory left behind by a killed writer (its process is gone) from one still being written
(`remove_stale_staging`). This module imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile


class PublishError(OSError):
    """A staged directory could neither replace its target nor be rolled back; the message says where the old
    contents are."""


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname())[:40] or "host"


def _marker() -> str:
    return f"{_host()}-{os.getpid()}-"


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory renamed over it: a reader sees
    the old file or the new one, never a partial one, and a failed write leaves no temporary file behind."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_json(path: str | os.PathLike, error: type[Exception], *, missing: str = "", damaged: str = ""):
    """The JSON value in ``path``, or ``error(message)`` naming the path when it is missing (``missing`` says what
    to do), unreadable, not UTF-8 or not JSON (``damaged`` says what to do). Callers check the value's type."""
    path = os.fspath(path)
    fix = f"; {damaged}" if damaged else ""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise error(f"{path}: no such file" + (f"; {missing}" if missing else "")) from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{path}: not valid JSON: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}){fix}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}){fix}") from None


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def overlapping_input(output: str | os.PathLike, inputs) -> str | None:
    """The first of ``inputs`` that ``output`` is, contains or lies inside (symbolic links resolved), else None.

    Writing such an output would delete or rewrite what the command reads.
    """
    out = os.path.realpath(os.fspath(output))
    for src in inputs:
        real = os.path.realpath(os.fspath(src))
        if _within(real, out) or _within(out, real):
            return os.fspath(src)
    return None


def make_staging_dir(target: str) -> str:
    """A new empty directory next to ``target`` (hidden name marked with this host and process) with the
    permissions a plain ``mkdir`` would give (``tempfile.mkdtemp``'s private mode would otherwise become the
    published directory's)."""
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-{_marker()}", dir=os.path.dirname(target))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _writer_gone(rest: str) -> bool:
    """Whether the writer named by a staging suffix ``HOST-PID-RANDOM`` has ended. Names without a marker
    (older versions) count as abandoned; directories of another host are left alone."""
    parts = rest.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    host, pid = parts[0], int(parts[1])
    if host != _host():
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_staging(target: str | os.PathLike) -> list[str]:
    """Remove the staging directories of ``target`` that a killed writer left behind; return their paths.

    A ``.NAME.old-*`` directory holds a target moved aside by an interrupted `publish_directory`: if ``target``
    itself is missing, those previous contents are moved back instead of being removed.
    """
    target = os.path.abspath(os.fspath(target))
    parent, base = os.path.dirname(target), os.path.basename(target)
    removed: list[str] = []
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return removed
    for kind in ("old", "tmp"):
        prefix = f".{base}.{kind}-"
        for name in names:
            path = os.path.join(parent, name)
            if not name.startswith(prefix) or not os.path.isdir(path) or not _writer_gone(name[len(prefix) :]):
                continue
            previous = os.path.join(path, "previous")
            if kind == "old" and os.path.isdir(previous) and not os.path.lexists(target):
                with contextlib.suppress(OSError):
                    os.replace(previous, target)
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
    return removed


def publish_directory(staged: str, target: str) -> None:
    """Move the complete directory ``staged`` to ``target`` (same filesystem), replacing an existing ``target``.

    A directory cannot be renamed over a non-empty one, so an existing ``target`` is first moved aside, and moved
    back if the second rename fails: at every moment either the old or the new directory is at ``target``.
    """
    if not os.path.lexists(target):
        os.replace(staged, target)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-{_marker()}", dir=os.path.dirname(target))
    previous = os.path.join(old, "previous")
    try:
        os.replace(target, previous)
    except BaseException:
        os.rmdir(old)
        raise
    try:
        os.replace(staged, target)
    except BaseException as e:
        try:
            os.replace(previous, target)
        except OSError as restore_error:
            raise PublishError(
                f"{target}: could not be replaced ({e}) nor restored ({restore_error.strerror or restore_error}); "
                f"its previous contents are kept in {previous}: move them back by hand"
            ) from e
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(directory: str) -> None:
    """Flush every file and directory under ``directory`` to disk, so that the rename that publishes the output
    never exposes data still sitting in the page cache."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
