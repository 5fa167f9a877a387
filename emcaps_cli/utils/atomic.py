"""Write files so that a failure never damages what is already on disk."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from emcaps_cli.errors import EmcapsError


def _writer_tag() -> str:
    """Host and process of this writer, as they appear in its temporary file names."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers of `target` on this host left when they died
    (killed with SIGKILL, power loss). A live writer's file is never touched. Returns them."""
    target = Path(target)
    host = _writer_tag().rsplit("-", 1)[0]
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{host}-(\d+)\.[^.]+\.tmp$")
    removed = []
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            match = pattern.match(entry.name)
            if match and not _process_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    `target` is left byte-for-byte as it was. The temporary name `.NAME.HOST-PID.XXXX.tmp`
    says which process writes it, so temporaries of writers that died are removed here.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    prefix = f".{target.name}.{_writer_tag()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(directory: Path, option: str, target: Path) -> None:
    """`directory` (or the ancestor that exists) is a directory this process may write in."""
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise EmcapsError(f"{option} {target}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EmcapsError(
            f"{option} {target}: cannot write in {existing} (read-only or no permission)"
        )


def check_output_file(target: str | os.PathLike, option: str) -> None:
    """Refuse, before any work, an output file that could not be written: a directory in its
    place, a parent that is a file, or a directory that is read-only or not ours."""
    target = Path(target)
    if target.is_dir():
        raise EmcapsError(f"{option} {target}: is a directory, expected a file name")
    _check_can_create_in(target.parent, option, target)


def check_output_dir(target: str | os.PathLike, option: str) -> None:
    """Refuse, before any work, an output directory that could not be written: a file in its
    place, or a location that is read-only or not ours."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise EmcapsError(f"{option} {target}: is a file, expected a directory")
    _check_can_create_in(target, option, target)
