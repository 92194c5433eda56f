"""Time series -> windowed forecasting data: lookback L values in, the next H values out.

The split is chronological (train, then val, then test; never shuffled across time); a val or test window may
look back into the part before it, but its targets lie inside its own part. Scaling statistics come from the
training part only. Files and manifest have the layout `prepare` writes for images (task "regression"):
x (N, L, 1) float32 and y (N, H) float32, both in the series' own units.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.config import DataConfig
from tasks.data import DataError, write_prepared

SEASON = {"sunspots": 11, "co2": 12}  # the solar cycle in years; months in a year


def read_sunspots(cfg: DataConfig | None = None) -> tuple[np.ndarray, str]:
    import statsmodels.api as sm  # bundled datasets, no download

    d = sm.datasets.sunspots.load_pandas().data  # yearly, 1700-2008
    return d["SUNACTIVITY"].to_numpy(np.float64), "yearly mean sunspot number, 1700-2008"


def read_co2(cfg: DataConfig | None = None) -> tuple[np.ndarray, str]:
    import statsmodels.api as sm

    d = sm.datasets.co2.load_pandas().data  # weekly Mauna Loa CO2 (ppm), 1958-2001, with gaps
    monthly = d["co2"].resample("MS").mean().interpolate("linear")
    return monthly.to_numpy(np.float64), "monthly mean CO2 at Mauna Loa (ppm), 1958-2001"


def windows(series: np.ndarray, lookback: int, horizon: int, targets: range) -> tuple[np.ndarray, np.ndarray]:
    """Windows whose first target index is in `targets`: x (N, L, 1), y (N, H)."""
    starts = [t for t in targets if t - lookback >= 0 and t + horizon <= len(series)]
    x = np.stack([series[t - lookback:t] for t in starts])[:, :, None]
    y = np.stack([series[t:t + horizon] for t in starts])
    return x.astype(np.float32), y.astype(np.float32)


def split_series(cfg: DataConfig, series: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    n, L, H = len(series), cfg.lookback, cfg.horizon
    n_test, n_val = int(round(n * cfg.test_fraction)), int(round(n * cfg.val_fraction))
    val_start, test_start = n - n_test - n_val, n - n_test
    if val_start - L < 10 or min(n_val, n_test) < H:
        raise DataError(f"data.lookback={L} / data.horizon={H} leave too few windows in a {n}-value series; "
                        "use a shorter lookback or horizon, or smaller val/test fractions")
    return {"train": windows(series, L, H, range(L, val_start - H + 1)),
            "val": windows(series, L, H, range(val_start, test_start - H + 1)),
            "test": windows(series, L, H, range(test_start, n - H + 1))}


def prepare_series(cfg: DataConfig, seed: int, out_dir: Path, read) -> dict:
    series, description = read(cfg)
    splits = split_series(cfg, series)  # raises before out_dir is touched
    n_train = len(series) - int(round(len(series) * cfg.test_fraction)) - int(round(len(series) * cfg.val_fraction))
    fit = series[:n_train]  # scaling from the training part only
    return write_prepared(out_dir, splits, {
        "source": cfg.source, "task": "regression", "description": description,
        "input_shape": [cfg.lookback, 1], "num_classes": cfg.horizon,  # outputs: one per forecast step
        "classes": [],
        "normalization": {"mean": [float(fit.mean())], "std": [float(max(fit.std(), 1e-8))]},
        "series": {"length": len(series), "lookback": cfg.lookback, "horizon": cfg.horizon,
                   "season": cfg.season or SEASON[cfg.source], "train_values": n_train},
    }, cfg=cfg, seed=seed)
