"""PNG plots of a benchmark run (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path


def write_plots(records: list[dict], summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = summary["per_condition"]
    names = list(per)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([[r["latency_s"] for r in records if r["condition"] == c] for c in names], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel("latency per problem (s)")
    ax.set_title(f"{summary['model']}: latency by condition ({summary['problems']} problems)")
    paths.append(_save(fig, out / "latency.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(names)
    for stage, color in (("prefill_s", "#4c72b0"), ("decode_s", "#55a868"), ("verify_s", "#c44e52")):
        heights = [per[c][f"mean_{stage}"] for c in names]
        ax.bar(names, heights, bottom=bottom, label=stage[:-2], color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("mean seconds per problem")
    ax.legend()
    ax.set_title("where the time goes")
    paths.append(_save(fig, out / "stages.png"))

    bases = [b for b in ("naive", "nokv") if any(f"speedup_vs_{b}" in per[c] for c in names)]
    if bases:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(bases)
        for k, base in enumerate(bases):
            xs, ys, errs = [], [], [[], []]
            for i, c in enumerate(names):
                s = per[c].get(f"speedup_vs_{base}")
                if s:
                    xs.append(i + k * width)
                    ys.append(s["ratio"])
                    errs[0].append(s["ratio"] - s["low"])
                    errs[1].append(s["high"] - s["ratio"])
            ax.bar(xs, ys, width, yerr=errs, capsize=4, label=f"vs {base}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([i + width * (len(bases) - 1) / 2 for i in range(len(names))], names)
        ax.set_ylabel("speedup (ratio of mean latency), 95% CI")
        ax.legend()
        paths.append(_save(fig, out / "speedup.png"))

    scored = [c for c in names if per[c]["accuracy"] is not None]
    if scored:  # the trade-off every early-exit policy makes: accuracy against work per problem
        from scipy.stats import binomtest

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        # machine time per problem: with problems in flight a solve's latency is not its cost
        for ax, cost, label in ((axes[0], lambda q: q["tokens_per_problem"], "tokens generated per problem"),
                                (axes[1], lambda q: q["wall_s"] / q["n"],
                                 "wall seconds per problem (wall time / problems, in flight as run)")):
            top, right = 0.0, 0.0
            for c in scored:
                n, acc = per[c]["n"], per[c]["accuracy"]
                ci = binomtest(round(acc * n), n).proportion_ci(method="wilson")
                x, y = cost(per[c]), acc * 100
                ax.errorbar(x, y, yerr=[[y - ci.low * 100], [ci.high * 100 - y]], fmt="o", capsize=4)
                ax.annotate(c, (x, y), textcoords="offset points", xytext=(4, 4))
                top, right = max(top, ci.high * 100), max(right, x)
            # both axes from zero: a point or two of accuracy, or a few percent of work, look their size
            ax.set_xlim(0, right * 1.15 or 1)
            ax.set_ylim(0, min(100, top + 5))
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy (%), 95% Wilson interval")
        fig.suptitle(f"{summary['model']}: accuracy against cost ({summary['problems']} problems; paired "
                     f"differences against rksc are in summary.json)")
        paths.append(_save(fig, out / "accuracy_cost.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
