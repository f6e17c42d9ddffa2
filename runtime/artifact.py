"""The artifact folder's manifest: its schema, loading, and sha256 checks of every listed file.

An artifact is a folder with `manifest.json` and the ONNX graphs it lists. The toolchain writes it
(qexport.export.artifact) through `Manifest.to_json`; the runtime reads it with `load_artifact`,
which refuses a folder whose files are missing or whose hashes differ from the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "qexport-artifact/1"
MANIFEST = "manifest.json"
# Roles of graph files, in the order the sampler prefers them.
GRAPH_ROLES = ("int", "qdq", "static-group", "fp32")


class ArtifactError(Exception):
    """The artifact folder is unusable: one line naming the problem and the fix."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int
    role: str


@dataclass(frozen=True)
class Manifest:
    format: str
    source: dict
    bits: dict
    groups: int
    num_train_timesteps: int
    sample_shape: list
    inputs: list
    outputs: list
    scheduler: dict
    files: dict[str, FileEntry]
    method: str = "fp32"
    qexport_version: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        if d.get("format") != FORMAT:
            raise ArtifactError(f"manifest format {d.get('format')!r} is not {FORMAT!r}; re-export the artifact "
                                f"with this qexport version")
        files = {k: FileEntry(**v) for k, v in d["files"].items()}
        return cls(**{**d, "files": files})

    def files_with_role(self, role: str) -> list[str]:
        return [name for name, e in self.files.items() if e.role == role]


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: Manifest

    def graph(self, role: str | None = None) -> Path:
        """Path of the graph with `role` (default: the fastest integer graph present)."""
        roles = [role] if role else [r for r in GRAPH_ROLES]
        for r in roles:
            names = self.manifest.files_with_role(r)
            if names:
                return self.path / names[0]
        have = sorted({e.role for e in self.manifest.files.values()})
        raise ArtifactError(f"artifact {self.path} has no graph with role {role!r} (it has: {', '.join(have)})")

    @property
    def graph_roles(self) -> list[str]:
        return [r for r in GRAPH_ROLES if self.manifest.files_with_role(r)]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path, role: str) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size, role=role)


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read `path/manifest.json`; with `verify`, check each file's size and sha256 against it."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.exists():
        raise ArtifactError(f"{path} has no {MANIFEST}; pass the folder written by `qexport convert`")
    try:
        manifest = Manifest.from_dict(json.loads(mf.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ArtifactError(f"{mf} is not a valid qexport manifest ({e}); re-export the artifact") from None
    if verify:
        for name, entry in manifest.files.items():
            f = path / name
            if not f.exists():
                raise ArtifactError(f"{f} is listed in the manifest but missing; copy the whole artifact folder")
            if f.stat().st_size != entry.bytes or sha256_file(f) != entry.sha256:
                raise ArtifactError(f"{f} does not match its sha256 in the manifest (corrupt or modified); "
                                    f"copy the artifact again or re-export it")
    return Artifact(path, manifest)
