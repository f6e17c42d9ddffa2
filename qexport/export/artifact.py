"""Atomic writing of an artifact folder: graphs are written into a temporary sibling folder, the
manifest (runtime.artifact's schema) is written last, then the folder is renamed into place. A
failure at any point leaves no output folder behind."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from qexport_runtime.artifact import FORMAT, MANIFEST, Manifest, file_entry

from .. import __version__
from ..errors import QexportError

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
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self

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
        self._finished = True
        return manifest

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._finished:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
        self.dir.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("wrote %s", self.out)
