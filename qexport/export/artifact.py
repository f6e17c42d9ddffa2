"""Atomic writing of an artifact folder: graphs are written into a temporary sibling folder, the
manifest (runtime.artifact's schema) is written last, then the folder is renamed into place. A
failure at any point (an exception, Ctrl-C, a full disk) leaves no output folder behind and any
previous artifact intact; a killed writer's temporary folder is removed by the next writer of the
same output. Writers of one output folder take an exclusive lock (`.<name>.lock`): a second one
fails at once instead of racing the first."""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path

from qexport_runtime.artifact import FORMAT, MANIFEST, Manifest, file_entry

from .. import __version__
from ..errors import QexportError, interrupted

log = logging.getLogger(__name__)


class ArtifactWriter:
    """`with ArtifactWriter(out) as w: save graphs under w.dir; w.add(name, role); w.finish(**fields)`."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        self.roles: dict[str, str] = {}
        self._finished = False

    def __enter__(self) -> "ArtifactWriter":
        if self.out.exists() and not self.overwrite:
            raise QexportError(f"output folder {self.out} already exists; pass --overwrite or choose another -o")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.out.with_name(f".{self.out.name}.lock"), "a+")
        except OSError as e:
            raise QexportError(f"cannot write in {self.out.parent} ({e.strerror}); choose a writable -o") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise QexportError(f"another qexport is writing {self.out} right now; wait for it to finish or "
                               f"choose another -o") from None
        self._remove_stale()
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        except OSError as e:
            self._unlock()
            raise QexportError(f"cannot write in {self.out.parent} ({e.strerror}); choose a writable -o") from None
        return self

    def _remove_stale(self) -> None:
        """Temporary folders of earlier writers of this output that died (SIGKILL, power loss): with the
        lock held, no live writer owns one."""
        for p in self.out.parent.glob(f".{glob.escape(self.out.name)}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.out.parent.glob(f".{glob.escape(self.out.name)}.old-*"):
            shutil.rmtree(p, ignore_errors=True)

    def _unlock(self) -> None:
        try:
            os.unlink(self._lock.name)  # leave no stray file; a writer that opened it first fails at flock
        except OSError:
            pass
        self._lock.close()

    def add(self, name: str, role: str) -> Path:
        """Declare file `name` (written or to be written in `self.dir`) with manifest `role`."""
        self.roles[name] = role
        return self.dir / name

    def finish(self, **fields) -> Manifest:
        files = {}
        for name, role in self.roles.items():
            path = self.dir / name
            if not path.exists():
                raise RuntimeError(f"artifact file {name} was declared but not written")
            files[name] = file_entry(path, role)
        manifest = Manifest(format=FORMAT, files=files, qexport_version=__version__, **fields)
        (self.dir / MANIFEST).write_text(manifest.to_json())
        # mkdtemp makes the folder 0700 and some writers make files 0600: give the artifact the modes a
        # plain `mkdir` / `open` would (umask applies), so other users and containers can read it
        umask = os.umask(0)
        os.umask(umask)
        for f in self.dir.iterdir():
            os.chmod(f, 0o666 & ~umask)
        os.chmod(self.dir, 0o777 & ~umask)
        self._finished = True
        return manifest

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None or not self._finished:
                shutil.rmtree(self.dir, ignore_errors=True)
                return
            if interrupted.is_set():   # a Ctrl-C whose KeyboardInterrupt Python swallowed on the way
                shutil.rmtree(self.dir, ignore_errors=True)
                raise KeyboardInterrupt
            old = None
            if self.out.exists():
                if not self.overwrite:  # appeared while we worked (a writer without the lock)
                    shutil.rmtree(self.dir, ignore_errors=True)
                    raise QexportError(f"output folder {self.out} appeared while converting; pass --overwrite or "
                                       f"choose another -o")
                old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                self.out.rename(old)
            self.dir.rename(self.out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            log.info("wrote %s", self.out)
        finally:
            self._unlock()
