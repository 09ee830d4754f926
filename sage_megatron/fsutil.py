"""Files: atomic output directories (write under a temporary sibling, rename when complete), and where
files shared between processes of one host go."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, *, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out_dir`` only if the block completes.

    An existing ``out_dir`` is refused unless ``overwrite``; then it is replaced only after the new
    one is complete (a crash leaves the old output intact and at most a ``.tmp-*`` sibling behind).
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: choose another --out-dir or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def shm_directory() -> str:
    """Where files shared between processes of one host go: /dev/shm (memory) where it exists, else the
    temp directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def file_identity(path: str) -> list[int] | None:
    """``[st_dev, st_ino]`` of ``path`` as this process sees it; None if it cannot see it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]
