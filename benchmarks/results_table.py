"""Markdown tables from `rksc bench` summary.json files, for benchmarks/RESULTS.md.

    python benchmarks/results_table.py runs/paper-qwen05/summary.json [more summary.json ...]
"""

from __future__ import annotations

import json
import sys


def fmt_speedup(s: dict | None) -> str:
    if not s:
        return "-"
    p = "" if s["p_value"] is None else f", p={s['p_value']:.1g}"
    return f"{s['ratio']:.2f}x [{s['low']:.2f}, {s['high']:.2f}]{p}"


def table(summary: dict) -> str:
    cfg = summary["config"]
    lines = [f"**{summary['model']}**, {cfg['dataset']} problems {cfg['offset']}..{cfg['offset'] + summary['problems'] - 1}"
             f" ({summary['problems']}), regime `{cfg['regime']}`, B={cfg['branches']}, select={cfg['select']}",
             "",
             "| condition | mean s | median s | prefill s | decode s | verify s | decode tok/s | accuracy "
             "| vs naive [95% CI] | vs nokv [95% CI] | KV held (decode) | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, m in summary["per_condition"].items():
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.0%}"
        lines.append(
            f"| {c} | {m['mean_s']:.2f} | {m['median_s']:.2f} | {m['mean_prefill_s']:.2f} | {m['mean_decode_s']:.2f} "
            f"| {m['mean_verify_s']:.2f} | {m['tok_s']:.0f} | {acc} | {fmt_speedup(m.get('speedup_vs_naive'))} "
            f"| {fmt_speedup(m.get('speedup_vs_nokv'))} | {m['kv_decode_peak_bytes'] / 2**20:.0f} MB "
            f"| {m['peak_rss_bytes'] / 2**30:.2f} GiB |")
    lines.append("")
    mean = {c: m["mean_s"] for c, m in summary["per_condition"].items()}
    if "prefix" in mean:
        rel = ", ".join(f"{c} {mean['prefix'] / v:.2f}x" for c, v in mean.items() if c != "prefix")
        lines.append(f"Ratio of means against `prefix`: {rel}.")
    agree = ", ".join(f"{k} {v:.0%}" for k, v in summary["answer_agreement"].items() if v is not None)
    chosen = ", ".join(f"{k} {v:.0%}" for k, v in summary.get("chosen_branch_agreement", {}).items() if v is not None)
    lines.append(f"Selected-answer agreement: {agree}. Same chosen branch: {chosen}.")
    for c, why in summary.get("unavailable", {}).items():
        lines.append(f"Unavailable: `{c}` {why}.")
    lines.append(f"Command: `{summary.get('command')}`")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(json.load(open(path))))
        print()
