"""What each early-exit knob trades: answers changed against work saved, replayed on the full
computation `rksc calibrate` recorded. Descriptive only: it reads the calibration split, which is
where thresholds are chosen, and chooses nothing (`rksc calibrate` fits by fixed-sequence testing).

For every knob of `replay.knobs` and every notch of it, `exact` plus that policy alone; then the
cumulative fixed sequence (`replay.path`) walked to its end, not stopped at its first failure.
Each point: selected answers changed against full computation (with the one-sided 95%
Clopper-Pearson bound), decode steps and tokens saved, verifier calls skipped, and the speed-up
those tokens would give with problems in flight (the engine refills freed rows at once, so
throughput follows tokens: 1 / (1 - tokens saved)). Writes JSON and a plot.

    python benchmarks/cgee_frontier.py benchmarks/results/calibrate-qwen05-1019-1318 \
        --out benchmarks/results/cgee05-frontier
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from rksc.bench import replay
from rksc.reasoning import early


def point(traces: list[dict], knob: str, names: tuple[str, ...], th: early.Thresholds, fields: dict) -> dict:
    s = replay.evaluate(traces, names, th)
    return {"knob": knob, "set": {k: replay._plain(v) for k, v in fields.items()}, "policies": list(names),
            "n": s.n, "disagree": s.disagree, "disagree_share": s.disagree / s.n, "bound": s.bound,
            "steps_saved": s.steps_saved, "tokens_saved": s.tokens_saved, "verify_skipped": s.verify_skipped,
            "layers_saved": s.layers_saved, "accuracy": s.accuracy,
            "throughput_if_tokens_follow": 1 / (1 - s.tokens_saved) if s.tokens_saved < 1 else None}


def frontier(traces: list[dict], progress: bool = True) -> dict:
    from tqdm import tqdm

    ks = {k: v for k, v in replay.knobs(traces).items() if v[1]}
    todo = sum(len(v) for _, v in ks.values()) + len(replay.path(traces))
    bar = tqdm(total=todo, desc="replay", disable=not progress)
    alone = []
    for knob, (policy, settings) in ks.items():
        for fields in settings:
            alone.append(point(traces, knob, ("exact", policy), replace(early.Thresholds(), **fields), fields))
            bar.update()
    walked, names, th = [], ("exact",), early.Thresholds()
    for knob, policy, fields in replay.path(traces):
        names = names if policy in names else (*names, policy)
        th = replace(th, **fields)
        walked.append(point(traces, knob, names, th, fields))
        bar.update()
    bar.close()
    return {"exact": point(traces, "exact", ("exact",), early.Thresholds(), {}), "alone": alone, "path": walked}


def plot(result: dict, title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    knobs = list(dict.fromkeys(p["knob"] for p in result["alone"]))
    for knob in knobs:
        pts = [p for p in result["alone"] if p["knob"] == knob]
        ax.plot([p["disagree_share"] * 100 for p in pts], [p["tokens_saved"] * 100 for p in pts], "o-", ms=4,
                label=f"exact + {knob} alone")
    pts = result["path"]
    ax.plot([p["disagree_share"] * 100 for p in pts], [p["tokens_saved"] * 100 for p in pts], "k.--", lw=1,
            label="fixed sequence, walked to its end")
    e = result["exact"]
    ax.plot([0], [e["tokens_saved"] * 100], "k*", ms=12, label="exact (lossless)")
    ax.axvline(1.0, color="grey", lw=1)
    ax.text(1.05, ax.get_ylim()[1] * 0.95, "1% disagreement target", color="grey", va="top", fontsize=8)
    ax.axhline(100 / 3, color="grey", lw=1, ls=":")
    ax.text(ax.get_xlim()[1], 100 / 3, "1.5x if throughput follows tokens", color="grey", ha="right",
            va="bottom", fontsize=8)
    ax.set_xlabel("selected answers changed against full computation (%, calibration split)")
    ax.set_ylabel("tokens saved (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "frontier.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an `rksc calibrate` output folder (meta.json, traces.jsonl or .gz)")
    parser.add_argument("--out", required=True, help="folder for frontier.json and frontier.png")
    args = parser.parse_args()
    folder, out = Path(args.folder), Path(args.out)
    path = replay.find_traces(folder, "traces")
    if path is None:
        sys.exit(f"cgee_frontier: {folder} holds no traces.jsonl (or .gz)")
    meta = json.loads((folder / "meta.json").read_text())
    traces = replay.load_traces(path)
    result = frontier(traces)
    result.update(model=meta["model"], dataset=meta["dataset"],
                  split=[meta["offset"], meta["offset"] + meta["limit"] - 1], problems=len(traces),
                  command=" ".join([Path(sys.executable).name] + sys.argv))
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(result, indent=2) + "\n")
    title = (f"{meta['model']}, {meta['dataset']} {result['split'][0]}-{result['split'][1]} ({len(traces)} problems): "
             "work saved against answers changed")
    png = plot(result, title, out)
    print(f"{'knob':<8} {'set':<44} {'changed':>8} {'bound':>7} {'steps':>7} {'tokens':>7} {'x tok':>6}")
    for p in [result["exact"], *result["alone"]]:
        x = p["throughput_if_tokens_follow"]
        print(f"{p['knob']:<8} {json.dumps(p['set']):<44} {p['disagree']:>4}/{p['n']:<3} {p['bound']:>7.1%} "
              f"{p['steps_saved']:>7.1%} {p['tokens_saved']:>7.1%} {x:>6.2f}")
    held = [p for p in [result["exact"], *result["alone"], *result["path"]] if p["bound"] <= 0.01]
    if not held:  # below 299 problems not even 0 changed answers bounds disagreement at 1%
        print(f"no point above has its bound at or below 1% ({len(traces)} problems); wrote {out / 'frontier.json'} "
              f"and {png}")
        return
    best = max(held, key=lambda p: p["tokens_saved"])
    print(f"most tokens saved by any point above whose bound is at or below 1%: {best['tokens_saved']:.1%} "
          f"({best['knob']} {json.dumps(best['set'])}; the best of many, so its own bound does not hold); wrote {out / 'frontier.json'} and {png}")


if __name__ == "__main__":
    main()
