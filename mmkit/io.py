"""Small file helpers: nothing is left half-written, and a killed process leaves something that can be recovered.

    atomic_write_json(path, obj)          # temp file in the same folder, fsync, rename, fsync the folder
    replace_dir(tmp, dest)                # swap a finished folder into place (the old one kept until it is)
    recover_dir(dest)                     # after a kill between the two renames of replace_dir: put dest back
    sha256_file(path)                     # integrity hashes of checkpoint files

Files written here get the permissions of any new file (0666 minus the umask, usually 0644): a temporary file made
by :func:`tempfile.mkstemp` is private (0600), which made every checkpoint and config unreadable to other users.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fast_mode", "fsync_dir", "make_tmp_dir",
           "share_files", "umask", "replace_dir", "recover_dir", "leftovers", "sha256_file", "TMP_SUFFIX", "OLD_SUFFIX"]

TMP_SUFFIX = ".tmp"            # .NAME.<pid>-<random>.tmp: a folder being written (complete once its marker file exists)
OLD_SUFFIX = ".old"            # .NAME.<pid>-<random>.old: the previous NAME, moved aside while the new one is renamed in
_OWNER = re.compile(r"\.(\d+)-[0-9a-f]+\.(?:tmp|old)$")


def fsync_dir(path: str | Path) -> None:
    """Make a rename / create / delete inside folder ``path`` durable (POSIX: fsync the directory itself)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:                      # e.g. Windows cannot open folders: renames there are durable anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path`` (atomic on POSIX), fsync the folder.

    A new file gets the usual permissions (0666 minus the umask); an existing file keeps its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = None
    # os.open with 0o666 lets the umask decide, exactly as open(path, "w") would (mkstemp forces 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def fast_mode() -> bool:
    """True when notebooks/tests should run their short versions (``MMKIT_FAST=1``, set by CI)."""
    return os.environ.get("MMKIT_FAST", "0") not in ("", "0", "false", "False")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Folders: replace one atomically enough that a kill at any moment leaves a recoverable state
# ---------------------------------------------------------------------------------------------------------

def umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status; elsewhere set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def share_files(folder: str | Path) -> None:
    """Give the files of ``folder`` (and the folder) the permissions of new files (0666 / 0777 minus the umask):
    some writers (safetensors, mkstemp) create 0600 files, which other users of a shared cache could not read."""
    mask = umask()
    folder = Path(folder)
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)
    folder.chmod(0o777 & ~mask)


def _hidden_name(dest: Path, suffix: str) -> Path:
    return dest.parent / f".{dest.name}.{os.getpid()}-{secrets.token_hex(6)}{suffix}"


def make_tmp_dir(dest: str | Path) -> Path:
    """A new empty sibling folder ``.NAME.<pid>-<random>.tmp`` of ``dest`` to write into before
    :func:`replace_dir` (permissions: 0777 minus the umask, like any new folder; ``mkdtemp`` would make it 0700)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_name(dest, TMP_SUFFIX)
    os.mkdir(tmp)
    return tmp


def _owner_alive(p: Path) -> bool:
    """Whether the process that made hidden folder ``p`` (its pid is in the name) still runs: then the folder may be
    in the middle of being written or swapped, and is left alone. Old-style names without a pid count as stale."""
    m = _OWNER.search(p.name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                     # exists, owned by another user
        return True
    return True


def leftovers(dest: str | Path) -> tuple[list[Path], list[Path]]:
    """The hidden siblings a :func:`replace_dir` of ``dest`` may leave: (``.NAME.*.tmp`` folders, ``.NAME.*.old``
    folders), newest first."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return [], []
    mine = re.compile(rf"^\.{re.escape(dest.name)}\.(?:[A-Za-z0-9_-]+\.)?(?:tmp|old)$")   # also mkdtemp's old names
    found = [p for p in dest.parent.iterdir() if mine.match(p.name) and p.is_dir()]

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:                  # removed meanwhile
            return 0.0

    def newest_first(ps):
        return sorted(ps, key=mtime, reverse=True)
    return (newest_first([p for p in found if p.name.endswith(TMP_SUFFIX)]),
            newest_first([p for p in found if p.name.endswith(OLD_SUFFIX)]))


def replace_dir(tmp: str | Path, dest: str | Path) -> None:
    """Put the finished folder ``tmp`` (a sibling of ``dest``) at ``dest``, replacing any folder there.

    A folder cannot be renamed over a non-empty one, so an existing ``dest`` is first renamed aside to
    ``.NAME.<random>.old``, then ``tmp`` is renamed to ``dest``, then the old copy is deleted; the parent folder is
    fsynced after each rename. If the second rename fails, the old folder is put back. If the process is killed
    between the two renames there is no ``dest`` for a moment: :func:`recover_dir` (which the readers call) renames
    the complete new copy (or else the old one) back into place.
    """
    tmp, dest = Path(tmp), Path(dest)
    parent = dest.parent
    fsync_dir(tmp)
    if not dest.exists():
        tmp.rename(dest)
        fsync_dir(parent)
        return
    old = _hidden_name(dest, OLD_SUFFIX)
    dest.rename(old)
    fsync_dir(parent)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)                     # roll back: the previous folder is where it was
        fsync_dir(parent)
        raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dest: str | Path, is_complete: Callable[[Path], bool], clean: bool = True) -> Path | None:
    """Repair what a killed :func:`replace_dir` (or a killed writer) left beside ``dest``; return ``dest`` if it is
    there afterwards, else None.

    * ``dest`` missing, a complete ``.tmp`` copy present (killed between the two renames): the newest complete copy
      becomes ``dest`` (it was fully written and fsynced before the first rename); else the newest ``.old`` copy;
    * with ``clean``: ``.old`` copies whose ``dest`` exists and incomplete ``.tmp`` folders (a writer killed while
      writing) are deleted, so hidden copies do not pile up.

    Only leftovers of processes that no longer run are touched (their pid is in the name): a folder another live
    process is still writing, or swapping in, is left to it.
    """
    dest = Path(dest)
    tmps, olds = (list(filter(lambda p: not _owner_alive(p), ps)) for ps in leftovers(dest))
    if not tmps and not olds:
        return dest if dest.exists() else None
    if not dest.exists():
        for cand in [t for t in tmps if is_complete(t)] + [o for o in olds if is_complete(o)]:
            try:
                cand.rename(dest)
            except OSError:
                continue
            fsync_dir(dest.parent)
            break
    if clean:
        tmps, olds = (list(filter(lambda p: not _owner_alive(p), ps)) for ps in leftovers(dest))
        for p in olds + [t for t in tmps if not is_complete(t)]:
            shutil.rmtree(p, ignore_errors=True)
        # a complete .tmp beside an existing dest: a newer copy that never got renamed in (killed after the first
        # rename and recovered from .old, or two writers); dest stays what readers saw, the copy goes
        for t in [t for t in tmps if is_complete(t)]:
            if dest.exists():
                shutil.rmtree(t, ignore_errors=True)
    return dest if dest.exists() else None
