"""Output directories, checked before any work whose results they are to hold."""
from __future__ import annotations

import os
import tempfile


def check_writable_directory(path: str, argument: str) -> None:
    """Raises `ValueError` naming `argument` unless `path` is a directory, or can be made one, in
    which files can be written; leaves nothing behind."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(path) else f"cannot be created: {existing} is a file"
        raise ValueError(f"{argument} {path} {where}; give a directory (it is created if missing).")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"{argument} {path} is not writable ({existing}: {e.strerror}); give a directory you "
                         f"can write to.") from None
