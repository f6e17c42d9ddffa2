"""The artifact folder's manifest: its schema, loading, and sha256 checks of every listed file.

An artifact is a folder with `manifest.json` and the ONNX graphs it lists. The toolchain writes it
(qexport.export.artifact) through `Manifest.to_json`; the runtime reads it with `load_artifact`.
Artifacts are untrusted input: the manifest's fields are type- and range-checked, file names must
stay inside the folder (no absolute paths, `..` or symlinks), and every file's size and sha256 must
match — anything else is an `ArtifactError` with one line naming the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

FORMAT = "qexport-artifact/1"
MANIFEST = "manifest.json"
# Roles of U-Net graph files, in the order the sampler prefers them (`ort`, the ORT-format copy of
# the integer graph, only when asked for: it loads only from a trusted artifact).
GRAPH_ROLES = ("int", "qdq", "static-group", "fp32", "ort")


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
    def from_dict(cls, d) -> "Manifest":
        """A manifest from untrusted JSON: every field's type and range checked (ArtifactError otherwise)."""
        if not isinstance(d, dict):
            raise ArtifactError(f"manifest is a JSON {type(d).__name__}, not an object; re-export the artifact")
        if d.get("format") != FORMAT:
            raise ArtifactError(f"manifest format {d.get('format')!r} is not {FORMAT!r}; re-export the artifact "
                                f"with this qexport version")
        known = {f.name for f in fields(cls)}
        if set(d) - known or REQUIRED - set(d):
            bad = sorted(map(str, set(d) - known)) or sorted(REQUIRED - set(d))
            raise ArtifactError(f"manifest has {'unknown' if set(d) - known else 'missing'} keys {bad}; "
                                f"re-export the artifact with this qexport version")
        for key, kind in FIELD_TYPES.items():
            if key in d and not (isinstance(d[key], kind) and not isinstance(d[key], bool)):
                raise ArtifactError(f"manifest field {key!r} must be a {kind.__name__}, not "
                                    f"{type(d[key]).__name__}; re-export the artifact")
        shape = d["sample_shape"]
        if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16
                                      for v in shape):
            raise ArtifactError(f"manifest sample_shape {shape!r} is not three positive sizes [C, H, W]")
        if not 0 < d["num_train_timesteps"] <= 1 << 20 or d["groups"] < 0:
            raise ArtifactError("manifest num_train_timesteps / groups are out of range; re-export the artifact")
        files = {}
        for name, e in d["files"].items():
            check_file_name(name)
            if not (isinstance(e, dict) and set(e) == {"sha256", "bytes", "role"} and isinstance(e["sha256"], str)
                    and len(e["sha256"]) == 64 and all(c in "0123456789abcdef" for c in e["sha256"])
                    and isinstance(e["bytes"], int) and not isinstance(e["bytes"], bool) and e["bytes"] >= 0
                    and isinstance(e["role"], str)):
                raise ArtifactError(f"manifest entry for {name!r} is not {{sha256, bytes, role}}; re-export the artifact")
            files[name] = FileEntry(**e)
        if not files:
            raise ArtifactError("manifest lists no files; re-export the artifact")
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


REQUIRED = {"format", "source", "bits", "groups", "num_train_timesteps", "sample_shape", "inputs", "outputs",
            "scheduler", "files"}
FIELD_TYPES = dict(source=dict, bits=dict, groups=int, num_train_timesteps=int, sample_shape=list, inputs=list,
                   outputs=list, scheduler=dict, files=dict, method=str, qexport_version=str, extra=dict)


def check_file_name(name) -> None:
    """A manifest file name must be a plain relative path inside the artifact folder."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if (not parts or name.startswith("/") or "\\" in name or "\0" in name or ".." in parts or ":" in name
            or len(name) > 255):
        raise ArtifactError(f"manifest names a file {name!r} outside the artifact folder (absolute, '..' or "
                            f"malformed); refusing to load it — re-export the artifact from a trusted source")


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
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{mf} is not a valid qexport manifest ({type(e).__name__}); re-export the artifact") \
            from None
    root = path.resolve()
    for name in manifest.files:
        f = path / name
        if f.is_symlink() or not f.resolve().is_relative_to(root):
            raise ArtifactError(f"{f} is a symlink or leads outside the artifact folder; refusing to load it — "
                                f"copy the artifact without links")
    if verify:
        for name, entry in manifest.files.items():
            f = path / name
            if not f.is_file():
                raise ArtifactError(f"{f} is listed in the manifest but missing; copy the whole artifact folder")
            if f.stat().st_size != entry.bytes or sha256_file(f) != entry.sha256:
                raise ArtifactError(f"{f} does not match its sha256 in the manifest (corrupt or modified); "
                                    f"copy the artifact again or re-export it")
    return Artifact(path, manifest)
