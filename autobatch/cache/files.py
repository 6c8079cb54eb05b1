"""Reading a probe cache file safely: a cache directory is input, and may hold anything.

:func:`read_regular` reads a regular file of at most :data:`MAX_FILE_BYTES`: a FIFO, a device (a symlink to
``/dev/zero``), a directory or an oversized file is refused without being read, so that no command can
hang or fill memory on a hostile cache directory. Imports no torch.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["MAX_FILE_BYTES", "CorruptFile", "read_regular"]


class CorruptFile(Exception):
    """A cache file that exists but cannot be used."""


MAX_FILE_BYTES = 1 << 20
"""A cache file larger than this is not one autobatch wrote (one holds a few KiB, whatever the model's
size: what grows with the model is stored as digests): it is not read."""


def read_regular(path: Path) -> bytes:
    """The bytes of the regular file at ``path`` (at most :data:`MAX_FILE_BYTES`).

    A FIFO, a device (a symlink to ``/dev/zero``, say), a directory or an oversized file is refused without
    being read, so no command can hang or fill memory on a hostile cache directory.

    Raises:
        FileNotFoundError: nothing is there (the directory may not exist yet): a plain miss.
        CorruptFile: something is there, but not a cache file that can be read.
    """
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise CorruptFile("not a regular file")
        if before.st_size > MAX_FILE_BYTES:
            raise CorruptFile(f"{before.st_size} bytes, more than a cache file holds ({MAX_FILE_BYTES})")
        # Non-blocking: were the file swapped for a FIFO after the stat, opening it could wait forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as exc:
        raise CorruptFile(f"cannot read it ({exc.strerror or exc})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptFile("not a regular file")
        chunks, total = [], 0
        while total <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_FILE_BYTES:
            raise CorruptFile(f"more than a cache file holds ({MAX_FILE_BYTES} bytes)")
        return b"".join(chunks)
    except OSError as exc:
        raise CorruptFile(f"cannot read it ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
