"""Forecasting runs (regression on windows of a series): RMSE and MAE beside the naive, seasonal-naive and
ARIMA forecasts of the same windows, in the series' own units, and the forecast-vs-actual figure. The windows are
tasks/data/series.py's; the step and the served model are the supervised ones (tasks/kinds/supervised.py)."""
from __future__ import annotations


import numpy as np

from tasks.kinds import Evaluation, register_kind
from tasks.kinds.supervised import Supervised
from tasks.figures import pyplot


def baselines(x: np.ndarray, horizon: int, season: int) -> dict[str, np.ndarray]:
    """Naive (the last value, repeated) and seasonal naive (the value one season before each target) forecasts
    from windows x (N, L, 1); seasonal naive needs a lookback of at least one season."""
    last = x[:, -1, 0]
    out = {"naive": np.repeat(last[:, None], horizon, axis=1)}
    L = x.shape[1]
    if season <= L and horizon <= season:
        out["seasonal_naive"] = np.stack([x[:, L - season + h, 0] for h in range(horizon)], axis=1)
    return out


def forecast_metrics(pred: np.ndarray, y: np.ndarray, x: np.ndarray, season: int) -> dict:
    rmse = lambda p: float(np.sqrt(np.mean((p - y) ** 2)))  # noqa: E731
    m = {"test_rmse": rmse(pred), "test_mae": float(np.mean(np.abs(pred - y)))}
    for name, p in baselines(x, y.shape[1], season).items():
        m[f"{name}_test_rmse"] = rmse(p)
        m[f"test_rmse_vs_{name}"] = m["test_rmse"] / max(m[f"{name}_test_rmse"], 1e-12)  # < 1: beats it
    return m


ARIMA_ORDERS = {"sunspots": ((9, 0, 0), (0, 0, 0, 0)),  # AR(9), the classic sunspot model
                "co2": ((1, 1, 1), (1, 0, 1, 12))}  # trend by differencing, yearly seasonality


def arima_reference(manifest: dict, y_test: np.ndarray) -> dict:
    """statsmodels' (seasonal) ARIMA fitted on everything before the test part, then one-step-ahead forecasts
    over the test part with those parameters: the same targets as the test windows (horizon 1 only)."""
    import time
    import warnings

    from statsmodels.tsa.arima.model import ARIMA

    s = manifest["series"]
    if s["horizon"] != 1:
        return {}
    from tasks.sources import reader

    series, _ = reader(manifest["source"])()
    test_start = len(series) - len(y_test)
    order, seasonal = ARIMA_ORDERS[manifest["source"]]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter
        fitted = ARIMA(series[:test_start], order=order, seasonal_order=seasonal).fit()
        pred = fitted.apply(series).get_prediction(start=test_start).predicted_mean
    rmse = float(np.sqrt(np.mean((pred - y_test[:, 0]) ** 2)))
    return {"arima_test_rmse": rmse, "arima_fit_seconds": time.perf_counter() - t0}


def forecast_figure(series_x: np.ndarray, y: np.ndarray, pred: np.ndarray, naive: np.ndarray, title: str):
    """One-step-ahead forecasts over the test part against the actual values and the naive forecast."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 3.4), dpi=110)
    t = np.arange(len(y))
    ax.plot(t, y[:, 0], color="black", lw=1.4, label="actual")
    ax.plot(t, pred[:, 0], color="tab:blue", lw=1.2, label="model")
    ax.plot(t, naive[:, 0], color="tab:gray", lw=1.0, ls="--", label="naive (last value)")
    ax.set_xlabel("test window")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


@register_kind
class Forecasting(Supervised):
    name, metric, classify, registry = "regression", "test_rmse", False, "nnlab-forecaster"
    lower_is_better = ("test_rmse", "test_mae")
    summary_columns = ("naive_test_rmse",)
    baselines = {"test_rmse": "naive_test_rmse"}

    def evaluate(self, cfg, name, model, final, data, data_dir, device) -> Evaluation:
        """Test RMSE/MAE in the series' units beside the naive and seasonal-naive forecasts of the same windows."""
        from tasks.kinds.supervised import predict
        from tasks.kinds.forecasting import arima_reference, baselines, forecast_figure, forecast_metrics

        norm, season = final["normalization"], final["series"]["season"]
        pred = predict(model, self.test_split(final, data, device).x).cpu().numpy() * norm["std"][0] + norm["mean"][0]
        metrics = forecast_metrics(pred, data.y_test, data.x_test, season)
        metrics |= arima_reference(data.manifest, data.y_test)
        if "arima_test_rmse" in metrics:
            metrics["test_rmse_vs_arima"] = metrics["test_rmse"] / max(metrics["arima_test_rmse"], 1e-12)
        beats = metrics["test_rmse"] < metrics["naive_test_rmse"]
        verdict = "beats" if beats else "does NOT beat"
        print(f"{name}: test RMSE {metrics['test_rmse']:.4g} {verdict} the naive forecast's "
              f"{metrics['naive_test_rmse']:.4g} (ratio {metrics['test_rmse_vs_naive']:.3f})"
              + (f"; seasonal naive {metrics['seasonal_naive_test_rmse']:.4g}" if "seasonal_naive_test_rmse" in metrics
                 else "") + (f"; ARIMA {metrics['arima_test_rmse']:.4g}" if "arima_test_rmse" in metrics else ""),
              flush=True)
        naive = baselines(data.x_test, pred.shape[1], season)["naive"]
        fig = forecast_figure(data.x_test, data.y_test, pred, naive,
                              f"{name}: test RMSE {metrics['test_rmse']:.4g} vs naive {metrics['naive_test_rmse']:.4g}")
        return Evaluation(metrics, fig, "plots/forecast.png", {"nnlab.beats_naive": str(beats).lower()})
