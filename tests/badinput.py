"""Checks shared by the bad-input suites: a clean one-line error and trees left exactly as they were."""

from __future__ import annotations

import hashlib
import os
import pathlib


def tree_digest(*roots: str | os.PathLike) -> dict[str, str]:
    """Every file and directory under ``roots`` (hidden ones included) -> the sha256 of its bytes ("dir" for a
    directory, "missing" for an absent root): equal digests mean nothing was added, removed or changed."""
    out: dict[str, str] = {}
    for root in map(pathlib.Path, roots):
        if not root.exists():
            out[str(root)] = "missing"
            continue
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        out[str(root)] = "dir"
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                out[os.path.join(dirpath, name)] = "dir"
            for name in filenames:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that start with ``error:``."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_clean_error(code: int, stderr: str, *needles: str, exit_code: int = 2) -> str:
    """``code`` is ``exit_code``; stderr holds no traceback and exactly one ``error:`` line, which contains every
    one of ``needles`` (file, key, value). Returns that line."""
    assert "Traceback" not in stderr, stderr
    assert code == exit_code, (code, stderr)
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
