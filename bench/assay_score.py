"""Time of scoring one window against one baseline: joey_core.assays.score next to simpler ways.

Systems, each on the same seeded data (baseline ~ N(0, 1), window ~ N(--shift, 1)):

* joey: ``joey_core.assays.score`` with its defaults (5 quantile bins, outlier bins, density, PSI),
  summaries of both sides included.
* naive-numpy: the same rules written the obvious way: ``np.quantile`` for the edges,
  ``np.searchsorted`` + ``np.bincount`` per value, ``np.median`` and friends for the stats.
  It must give the same score; the benchmark checks that.
* evidently: Evidently's PSI stat test (``psi_stat_test``) on the same two columns. It bins
  differently (Sturges bins over both samples, its own zero handling), so its score differs;
  only the time is comparable. Skipped, with a message, when Evidently cannot be imported.

Each figure is the median of ``--repeats`` timed calls after one warm-up call.

    python bench/assay_score.py --size 1000000 --repeats 7
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version

import numpy as np
import numpy.typing as npt

from joey_core.assays import score

Scorer = Callable[[npt.NDArray[np.float64], npt.NDArray[np.float64]], float]


def joey_score(baseline: npt.NDArray[np.float64], window: npt.NDArray[np.float64]) -> float:
    return score(baseline, window).score


def naive_score(baseline: npt.NDArray[np.float64], window: npt.NDArray[np.float64], bins: int = 5) -> float:
    edges = np.quantile(baseline, np.arange(1, bins + 1) / bins, method="hazen")
    lowest = baseline.min()

    def densities(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        index = np.searchsorted(edges, x, side="left") + 1
        index[(x < lowest) | np.isnan(x)] = 0
        return np.bincount(index, minlength=bins + 2) / x.size

    # The summaries joey_core.assays.score also returns, computed and dropped.
    _ = [(x.min(), x.max(), x.mean(), np.median(x), x.std()) for x in (baseline, window)]
    b, w = densities(baseline), densities(window)
    b[b == 0], w[w == 0] = 0.005, 0.005
    return float(((w - b) * np.log(w / b)).sum())


def evidently_scorer() -> Scorer | str:
    """Evidently's PSI, or why it cannot run here."""
    try:
        import pandas as pd
        from evidently.legacy.calculations.stattests import psi_stat_test
        from evidently.legacy.core import ColumnType
    except Exception as error:  # an incompatible install fails with more than ImportError
        return f"{type(error).__name__}: {error}"

    print(f"evidently {version('evidently')}, pandas {pd.__version__}")

    def evidently_score(baseline: npt.NDArray[np.float64], window: npt.NDArray[np.float64]) -> float:
        result = psi_stat_test(pd.Series(baseline), pd.Series(window), ColumnType.Numerical, None)
        return float(result.drift_score)

    return evidently_score


def timed(
    scorer: Scorer, baseline: npt.NDArray[np.float64], window: npt.NDArray[np.float64], repeats: int
) -> tuple[float, float, float]:
    """The score, and the median and minimum seconds of ``repeats`` calls."""
    value = scorer(baseline, window)  # warm-up: imports, caches, page faults
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        scorer(baseline, window)
        samples.append(time.perf_counter() - started)
    return value, statistics.median(samples), min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="values in the window")
    parser.add_argument("--baseline-size", type=int, help="values in the baseline (default: --size)")
    parser.add_argument("--shift", type=float, default=0.25, help="mean of the window; the baseline's is 0")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-evidently", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    baseline = rng.normal(0.0, 1.0, args.baseline_size or args.size)
    window = rng.normal(args.shift, 1.0, args.size)

    systems: dict[str, Scorer] = {"joey": joey_score, "naive-numpy": naive_score}
    evidently = "skipped (--skip-evidently)" if args.skip_evidently else evidently_scorer()
    if isinstance(evidently, str):
        print(f"evidently column skipped: {evidently}")
    else:
        systems["evidently"] = evidently

    print(
        f"baseline {baseline.size:,} values, window {window.size:,} values, median of {args.repeats} runs; "
        f"Python {platform.python_version()}, numpy {np.__version__}\n"
    )
    results = {name: timed(scorer, baseline, window, args.repeats) for name, scorer in systems.items()}
    if not np.isclose(results["naive-numpy"][0], results["joey"][0], rtol=1e-12, atol=0):
        naive, joey = results["naive-numpy"][0], results["joey"][0]
        raise SystemExit(f"naive-numpy and joey disagree: {naive} vs {joey}")
    joey_median = results["joey"][1]
    print("| system | median ms | min ms | time / joey | PSI |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (value, median, fastest) in results.items():
        ratio = median / joey_median
        print(f"| {name} | {median * 1e3:.1f} | {fastest * 1e3:.1f} | {ratio:.2f}x | {value:.6f} |")


if __name__ == "__main__":
    main()
