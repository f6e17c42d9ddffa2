"""The calibrator's Python API: MODEL → trajectories → statistics → `QuantTable`.

    from qexport.calibrate.api import CalibrationConfig, calibrate
    table, stats = calibrate(load_model("digits16-ddpm"), CalibrationConfig())
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import QexportError
from ..tables.build import TableConfig, build_table
from ..tables.ranges import RangeConfig
from ..tables.schema import QuantTable
from ..tables.stats import ActivationStats
from ..zoo.guidance import inner_unet
from ..zoo.loading import LoadedModel
from .observers import collect_statistics
from .sources import CalibrationSource, SourceConfig


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    table: TableConfig = field(default_factory=TableConfig)
    bins: int = 2048

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationConfig":
        """Build from JSON-like dicts; unknown keys are an error (no silently ignored options)."""
        def make(kind, data):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(data) - names
            if unknown:
                raise QexportError(f"unknown {kind.__name__} keys {sorted(unknown)}; valid keys: {sorted(names)}")
            return kind(**data)

        unknown = set(d) - {"source", "table", "bins"}
        if unknown:
            raise QexportError(f"unknown calibration config keys {sorted(unknown)}; valid: source, table, bins")
        table = dict(d.get("table", {}))
        rng = make(RangeConfig, table.pop("range", {}))
        return cls(source=make(SourceConfig, d.get("source", {})), table=make(TableConfig, {**table, "range": rng}),
                   bins=int(d.get("bins", 2048)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def unet_weights(unet: nn.Module) -> dict[str, np.ndarray]:
    """Float weights of every Conv2d / Linear, by module name."""
    return {n: m.weight.detach().numpy() for n, m in inner_unet(unet).named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def first_last_layers(unet: nn.Module) -> tuple[str, ...]:
    names = [n for n, m in inner_unet(unet).named_modules() if isinstance(m, nn.Conv2d)]
    return tuple(n for n in ("conv_in", "conv_out") if n in names) or (names[0], names[-1])


def calibrate(model: LoadedModel, cfg: CalibrationConfig = CalibrationConfig(),
              progress: bool = True) -> tuple[QuantTable, ActivationStats]:
    T = model.num_train_timesteps
    if cfg.source.steps > T or cfg.table.groups > T:
        raise QexportError(f"--steps {cfg.source.steps} / --groups {cfg.table.groups} exceed the model's {T} "
                           f"training time steps; choose at most {T}")
    source = CalibrationSource(model.scheduler_config, model.sample_shape, cfg.source)
    stats = collect_statistics(model.denoiser(), source, bins=cfg.bins, progress=progress)
    calib = dict(model_id=model.model_id, weights_sha256=model.weights_sha256, **cfg.to_dict(),
                 samples=source.num_samples)  # nothing run-dependent here: same inputs, same table bytes
    table = build_table(stats, model.num_train_timesteps, unet_weights(model.unet), cfg.table, calib,
                        first_last=first_last_layers(model.unet))
    return table, stats


def save_stats(stats: ActivationStats, folder: Path) -> None:
    """Histograms and ranges for `qexport inspect` (npz beside the tables)."""
    np.savez_compressed(folder / "stats.npz", sites=np.array(stats.sites), timesteps=stats.timesteps,
                        samples=stats.samples, numel=stats.numel, min=stats.min, max=stats.max, hist=stats.hist,
                        hist_lo=stats.hist_lo, hist_hi=stats.hist_hi, seconds=stats.seconds)


def load_stats(folder: Path) -> ActivationStats:
    z = np.load(folder / "stats.npz")
    return ActivationStats(sites=tuple(str(s) for s in z["sites"]), timesteps=z["timesteps"], samples=z["samples"],
                           numel=z["numel"], min=z["min"], max=z["max"], hist=z["hist"], hist_lo=z["hist_lo"],
                           hist_hi=z["hist_hi"], seconds=float(z["seconds"]))


def variation(stats: ActivationStats) -> list[dict]:
    from ..tables.build import range_variation

    return range_variation(stats.sites, stats.timesteps, stats.min, stats.max)
