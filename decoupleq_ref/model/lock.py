"""One writer per output folder: ``OUT/.lock`` holds the writer's pid, host and start time.

Taken with O_EXCL, so two runs into one folder cannot both write; the second is refused with who
holds the lock. A lock whose process is gone (same host, pid not alive: a killed run) is taken
over; a lock from another host cannot be checked and is reported with how to remove it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class FolderLock:
    """``with FolderLock(folder, option):`` — ValueError naming ``option`` when another live run holds it."""

    def __init__(self, folder: Path, option: str = "--out") -> None:
        self.folder, self.option = Path(folder), option
        self.path = self.folder / LOCK_NAME
        self.held = self.created = False

    def acquire(self) -> "FolderLock":
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ValueError(f"{self.option}: could not take the lock {self.path}; retry the command")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host = {}, None, None
        same_host = host == socket.gethostname()
        if pid is not None and same_host and not pid_alive(pid):
            # rename first: of two runs taking over one stale lock only one rename succeeds
            stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.replace(self.path, stale)
                stale.unlink()
            except FileNotFoundError:
                pass
            return
        who = f"pid {pid} on host {host} since {holder.get('since', '?')}" if pid is not None else "an unreadable lock"
        if same_host and pid == os.getpid():
            who += " (this process)"
        raise ValueError(f"{self.option}: {self.folder} is being written by another run ({who}); wait for it to "
                         f"finish or choose another {self.option} (if that run is dead, delete {self.path})")

    def release(self) -> None:
        """Remove the lock, and the folder when acquire made it and nothing else was written."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created and self.folder.is_dir() and not any(self.folder.iterdir()):
                self.folder.rmdir()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
