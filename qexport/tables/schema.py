"""`QuantTable`: per-time-step-group activation quantization parameters plus weight scales, and its
files (`tables.safetensors` for arrays + `tables.json` index).

Activation parameters are indexed by the raw training time step t: `g = group_of_t[t]`, then
`scale[g, i]` / `zero_point[g, i]` for site `sites[i]` (uint8 affine). Weight scales are per output
channel, keyed by module name (`weight_scale[module]`, symmetric, `weight_bits[module]` ∈ {4, 8}).
Integer weights are round-to-nearest of `w / scale` unless `weight_int[module]` holds learned
rounding (integers in the module's own layout, output channels first), which then wins. With
`saturation_safe` (the default) the integers are then encoded so that no CPU's kernel saturates
(tables.weights.saturation_safe); export and simulation both read them through `int_weight`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import QexportError

TABLES_JSON = "tables.json"
TABLES_ARRAYS = "tables.safetensors"
SCHEMA = "qexport-tables/1"


def is_time_branch(module: str) -> bool:
    """Modules on the path from the time step to each ResNet's time-embedding projection (diffusers names)."""
    return module.startswith("time_embedding.") or module.endswith(".time_emb_proj")


@dataclass(frozen=True)
class QuantTable:
    sites: tuple[str, ...]
    group_of_t: np.ndarray          # [T] int32
    range_lo: np.ndarray            # [K, S] float32: clipping range chosen by the method
    range_hi: np.ndarray            # [K, S]
    scale: np.ndarray               # [K, S] float32
    zero_point: np.ndarray          # [K, S] int64, uint8 domain
    act_bits: int
    method: str
    weight_scale: dict              # module -> [C_out] float32
    weight_bits: dict               # module -> 4 | 8
    calibration: dict = field(default_factory=dict)
    timesteps: np.ndarray | None = None   # [n] calibrated time steps (ascending)
    t_min: np.ndarray | None = None       # [S, n] observed minimum per calibrated time step
    t_max: np.ndarray | None = None       # [S, n]
    weight_int: dict = field(default_factory=dict)   # module -> int8 array (learned rounding), optional
    saturation_safe: bool = True                     # no same-sign input-weight pair with |a| + |b| > 128
    float_modules: tuple = ()                        # Conv/Linear modules left unquantized (no sites, no weights)

    def __post_init__(self):
        K, S = self.scale.shape
        if S != len(self.sites) or self.zero_point.shape != (K, S) or self.range_lo.shape != (K, S):
            raise ValueError("table arrays disagree on [groups, sites]")
        if self.group_of_t.min() < 0 or self.group_of_t.max() >= K:
            raise ValueError("group_of_t points outside [0, groups)")

    def int_weight(self, module: str, w: np.ndarray) -> np.ndarray:
        """Integer weights of `module` (layout of `w`, output channels first): learned rounding when
        the table holds it, else round-to-nearest of `w / scale`."""
        from .weights import quantize_weight, saturation_safe

        scale = self.weight_scale[module]
        learned = self.weight_int.get(module)
        if learned is not None:
            if learned.shape != w.shape:
                raise ValueError(f"{module}: learned integer weights {learned.shape} do not match weight {w.shape}")
            q = learned.astype(np.int8)
        else:
            q = quantize_weight(w, scale, int(self.weight_bits[module]))
        if self.saturation_safe:
            q, _ = saturation_safe(q, w / scale.reshape(-1, *([1] * (w.ndim - 1))))
        return q

    @property
    def groups(self) -> int:
        return int(self.scale.shape[0])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.group_of_t.shape[0])

    def is_float(self, site: str) -> bool:
        """Whether `site` belongs to a module the table leaves in float (`float_modules`)."""
        return any(site == m or site.startswith(m + ".") for m in self.float_modules)

    def half_precision(self, module: str) -> bool:
        """Whether the exported graphs store `module`'s weights as float16: the float modules of the t-only
        branch (export.passes.batch_time_projections); the simulation rounds them the same way."""
        return module in self.float_modules and is_time_branch(module)

    @property
    def time_embedding_table(self) -> bool:
        """Whether the exported graphs look the time MLP's output up by t from a float16 table
        (export.passes.tabulate_time_embedding); the simulation rounds it the same way."""
        return bool(self.calibration.get("table", {}).get("tabulate_time_embedding", False))

    def time_projection_table(self, embedding_dim: int) -> bool:
        """Whether the exported graphs also look every float time_emb_proj output up by t, from an int8 [T, ΣC]
        table with one scale per channel (export.passes.tabulate_time_embedding; the simulation rounds the
        same way), for a time embedding of `embedding_dim` D. "auto": where that table is no larger than the
        float16 weights it replaces (T ≤ 2·D: the cifar-config U-Net, D = 512; not the shipped one, D = 128);
        onnxruntime holds those weights as float32, so memory then falls by 4·D/T or more."""
        mode = self.calibration.get("table", {}).get("tabulate_time_projections", "never")
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"tabulate_time_projections must be auto, always or never, got {mode!r}")
        return self.time_embedding_table and (mode == "always" or (mode == "auto" and
                                                                   self.num_train_timesteps <= 2 * embedding_dim))

    @property
    def standard_ops_only(self) -> bool:
        """Whether the integer graph keeps to standard ONNX (`matmul_outputs="quantized"`: QLinearMatMul,
        float split-concat convs) instead of com.microsoft MatMulIntegerToFloat."""
        return self.calibration.get("table", {}).get("matmul_outputs", "float") == "quantized"

    def site_index(self, site: str) -> int:
        return self.sites.index(site)

    def params_at(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(scale [S], zero_point [S]) at training time step t."""
        g = int(self.group_of_t[t])
        return self.scale[g], self.zero_point[g]

    # -- files ---------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        a = dict(group_of_t=self.group_of_t, range_lo=self.range_lo, range_hi=self.range_hi, scale=self.scale,
                 zero_point=self.zero_point)
        if self.timesteps is not None:
            a.update(timesteps=self.timesteps, t_min=self.t_min, t_max=self.t_max)
        a.update({f"weight_scale/{k}": v for k, v in self.weight_scale.items()})
        a.update({f"weight_int/{k}": v.astype(np.int8) for k, v in self.weight_int.items()})
        return {k: np.ascontiguousarray(v) for k, v in a.items()}

    def digest(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.arrays().items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()

    def save(self, folder: str | Path, summary: dict | None = None) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.arrays(), str(folder / TABLES_ARRAYS))
        index = dict(schema=SCHEMA, qexport_version=__version__, sha256=self.digest(), sites=list(self.sites),
                     groups=self.groups, num_train_timesteps=self.num_train_timesteps, act_bits=self.act_bits,
                     method=self.method, weight_bits=self.weight_bits, saturation_safe=self.saturation_safe,
                     float_modules=list(self.float_modules), calibration=self.calibration, summary=summary or {})
        (folder / TABLES_JSON).write_text(json.dumps(index, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "QuantTable":
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / TABLES_JSON).exists() or not (folder / TABLES_ARRAYS).exists():
            raise QexportError(f"{folder} has no {TABLES_JSON} + {TABLES_ARRAYS}; pass the folder written by "
                               f"`qexport calibrate`")
        index = json.loads((folder / TABLES_JSON).read_text())
        if index.get("schema") != SCHEMA:
            raise QexportError(f"{folder}/{TABLES_JSON} has schema {index.get('schema')!r}, expected {SCHEMA!r}; "
                               f"recalibrate with this qexport version")
        arr = load_file(str(folder / TABLES_ARRAYS))
        ws = {k.split("/", 1)[1]: v for k, v in arr.items() if k.startswith("weight_scale/")}
        wi = {k.split("/", 1)[1]: v for k, v in arr.items() if k.startswith("weight_int/")}
        table = cls(sites=tuple(index["sites"]), group_of_t=arr["group_of_t"], range_lo=arr["range_lo"],
                    range_hi=arr["range_hi"], scale=arr["scale"], zero_point=arr["zero_point"],
                    act_bits=index["act_bits"], method=index["method"], weight_scale=ws,
                    weight_bits=index["weight_bits"], calibration=index["calibration"],
                    timesteps=arr.get("timesteps"), t_min=arr.get("t_min"), t_max=arr.get("t_max"), weight_int=wi,
                    saturation_safe=bool(index.get("saturation_safe", True)),
                    float_modules=tuple(index.get("float_modules", ())))
        if table.digest() != index["sha256"]:
            raise QexportError(f"{folder}: arrays do not match the sha256 in {TABLES_JSON}; recalibrate")
        return table
