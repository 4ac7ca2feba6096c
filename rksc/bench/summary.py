"""A `rksc bench` run summarized: per condition latency, stages, accuracy, memory, throughput,
bootstrap speed-ups and paired accuracy against the baselines (rksc.bench.stats), what early exit
and ASKS did; and the summary printed as tables.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from rksc.bench import stats
from rksc.reasoning.answers import same_answer


def summarize(records: list[dict], conditions: list[str], resamples: int = 2000,
              walls: dict[str, float] | None = None) -> dict:
    """Per condition: latency, stages, accuracy, memory; throughput from the wall time each condition
    took in all (with problems in flight, latencies overlap and their sum exceeds the wall time)."""
    import statistics as st

    by = {c: sorted((r for r in records if r["condition"] == c), key=lambda r: r["index"]) for c in conditions}
    per = {}
    for c, rs in by.items():
        lat = [r["latency_s"] for r in rs]
        scored = [r for r in rs if r["correct"] is not None]
        per[c] = {
            "n": len(rs), "mean_s": st.fmean(lat), "median_s": st.median(lat),
            **{f"mean_{k}": st.fmean(r[k] for r in rs) for k in ("prefill_s", "decode_s", "verify_s")},
            "tok_s": st.fmean(r["tok_s"] for r in rs),
            "accuracy": sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None,
            "prefix_tokens": st.fmean(r["prefix_tokens"] for r in rs),
            "kv_decode_peak_bytes": max(r["kv_bytes"].get("decode_peak", 0) for r in rs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
            "tokens_per_problem": st.fmean(r["new_tokens"] for r in rs),
            "steps_per_problem": st.fmean(r["steps"] for r in rs),
            "verify_calls": sum(r["verify_calls"] for r in rs),
            "early": early_summary(rs),
            "asks": asks_summary(rs),
        }
        wall = (walls or {}).get(c) or sum(lat)
        per[c].update(wall_s=wall, problems_per_hour=len(rs) * 3600 / wall if wall else None,
                      out_tok_s=sum(r["new_tokens"] for r in rs) / wall if wall else None,
                      concurrency=max(r.get("concurrency", 1) for r in rs))
        for base in ("naive", "nokv", "rksc"):
            if base in by and base != c:
                s = stats.speedup([r["latency_s"] for r in by[base]], lat, resamples)
                per[c][f"speedup_vs_{base}"] = asdict(s)
        if "rksc" in by and c != "rksc" and scored:
            pairs = [(a, b) for a, b in zip(by["rksc"], rs) if a["correct"] is not None]
            same = [(a["answer"] == b["answer"]) or same_answer(a["answer"], b["answer"]) for a, b in pairs]
            per[c]["vs_rksc"] = asdict(stats.paired([bool(a["correct"]) for a, _ in pairs],
                                                    [bool(b["correct"]) for _, b in pairs], same, resamples))
            if walls and walls.get("rksc") and wall:
                per[c]["wall_speedup_vs_rksc"] = walls["rksc"] / wall
    agreement, chosen = {}, {}
    for i, a in enumerate(conditions):
        for b in conditions[i + 1:]:
            pairs = list(zip(by[a], by[b]))
            same = sum((ra["answer"] == rb["answer"]) or same_answer(ra["answer"], rb["answer"]) for ra, rb in pairs)
            agreement[f"{a}|{b}"] = same / len(pairs) if pairs else None
            chosen[f"{a}|{b}"] = sum(ra["chosen"] == rb["chosen"] for ra, rb in pairs) / len(pairs) if pairs else None
    return {"per_condition": per, "answer_agreement": agreement, "chosen_branch_agreement": chosen}


def asks_summary(rs: list[dict]) -> dict | None:
    """Across one condition's problems: the branch prompts ASKS tried, reused and computed."""
    reports = [a for r in rs for a in (r.get("asks") or [])]
    if not any(r.get("asks") is not None for r in rs):
        return None
    tried = [a for a in reports if a is not None]
    reused = [a for a in tried if a["reused"]]
    return {"prompts": len(reports), "tried": len(tried), "reused": len(reused),
            "tokens": sum(a["tokens"] for a in tried), "computed": sum(a["recomputed"] for a in tried),
            "mean_similarity": sum(a["similarity"] for a in tried) / len(tried) if tried else None,
            "test_s": sum(a["test_s"] for a in tried), "prefill_s": sum(a["prefill_s"] for a in tried)}


def early_summary(rs: list[dict]) -> dict | None:
    """Across one condition's problems: what early exit did."""
    from collections import Counter

    runs = [r["early"] for r in rs if r.get("early")]
    if not runs:
        return None
    fired = Counter(f["policy"] for e in runs for f in e["fired"])
    reasons = Counter(x for r in rs for x in r["stop_reasons"])
    return {"problems_with_a_stop": sum(bool(e["fired"]) for e in runs), "fired": dict(fired),
            "stop_reasons": dict(reasons), "verifier_skipped": sum(e["verifier_skipped"] for e in runs),
            # None through a remote backend: the KV is freed on the server
            "kv_freed_bytes": None if any(e["kv_freed_bytes"] is None for e in runs)
            else sum(e["kv_freed_bytes"] for e in runs),
            "cap_tokens_left": sum(e["cap_tokens_left"] for e in runs),
            "probe": {k: sum(e.get("probe", {}).get(k, 0) for e in runs)
                      for k in ("probes", "prompt_tokens", "cached_tokens", "tokens")},
            "layer_exit": _layer_exit(runs)}


def _layer_exit(runs: list[dict]) -> dict | None:
    """What the verifier layer exit did: questions asked with it on, how many exited and where, and
    the decoder layers their steps did not run."""
    exits = [x for e in runs for x in (e.get("exit_layers") or {}).values()]
    if not any(e.get("exit_layers") is not None for e in runs):
        return None
    exited = [x for x in exits if x is not None]
    return {"questions": len(exits), "exited": len(exited),
            "mean_exit_layer": sum(exited) / len(exited) if exited else None,
            "layers_skipped": sum(e.get("verifier_layers_skipped", 0) for e in runs)}


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = summary["config"]
    compute = summary.get("compute")
    how = f", {compute['dtype']} with {compute['weights']} weights ({compute['kernel']})" if compute else ""
    where = f" on {summary['machine']['cpu']} ({summary['machine']['kind']})" if summary.get("machine") else ""
    t = Table(title=f"{summary['model']} on {cfg['dataset']} ({summary['problems']} problems), regime "
                    f"{cfg['regime']}, B={cfg['branches']}{how}{where}")
    cols = ("condition", "in flight", "mean s", "median s", "prefill", "decode", "verify", "problems/h", "tok/s", "acc",
            "x vs naive [95% CI]", "x vs nokv [95% CI]", "peak RSS")
    for col in cols:
        t.add_column(col, justify="left" if col == "condition" else "right")
    for c, m in summary["per_condition"].items():
        def sp(key):
            s = m.get(key)
            return "-" if s is None else f"{s['ratio']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.0%}"
        t.add_row(c, str(m["concurrency"]), f"{m['mean_s']:.2f}", f"{m['median_s']:.2f}", f"{m['mean_prefill_s']:.2f}",
                  f"{m['mean_decode_s']:.2f}", f"{m['mean_verify_s']:.2f}", f"{m['problems_per_hour']:.0f}",
                  f"{m['out_tok_s']:.1f}", acc,
                  sp("speedup_vs_naive"), sp("speedup_vs_nokv"), f"{m['peak_rss_bytes'] / 2**30:.2f} GiB")
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(t)
    for c, why in summary["unavailable"].items():
        console.print(f"unavailable: {c}: {why}")
    for c, missing in summary["missing_features"].items():
        console.print(f"note: {c} runs without {', '.join(missing)} (not built yet)")
    if cfg.get("thresholds"):
        console.print("note: thresholds set by hand, uncalibrated (no disagreement bound holds for them): "
                      + ", ".join(f"{k}={v}" for k, v in cfg["thresholds"].items()))
    agree = ", ".join(f"{k} {v:.0%}" for k, v in summary["answer_agreement"].items() if v is not None)
    if agree:
        console.print(f"selected-answer agreement: {agree}")
    early = [(c, m) for c, m in summary["per_condition"].items() if m.get("vs_rksc") or m.get("early")]
    if early:
        e = Table(title="against rksc without early exit or ASKS (same problems)")
        for col in ("condition", "tokens/problem", "steps/problem", "x wall vs rksc", "acc diff [95% CI]",
                    "McNemar p", "disagree (95% bound)", "induced errors / verify calls", "fired"):
            e.add_column(col, justify="left" if col in ("condition", "fired") else "right")
        for c, m in summary["per_condition"].items():
            v, ee = m.get("vs_rksc"), m.get("early") or {}
            fired = ", ".join(f"{k} {n}" for k, n in ee.get("fired", {}).items()) or "-"
            if ee.get("verifier_skipped"):
                fired += f", verifier skipped {ee['verifier_skipped']}"
            if ee.get("layer_exit"):
                le = ee["layer_exit"]
                fired += f", verifier layer exit {le['exited']}/{le['questions']} ({le['layers_skipped']} layer runs skipped)"
            e.add_row(c, f"{m['tokens_per_problem']:.0f}", f"{m['steps_per_problem']:.0f}",
                      f"{m['wall_speedup_vs_rksc']:.2f}" if m.get("wall_speedup_vs_rksc") else "-",
                      f"{v['accuracy_diff'] * 100:+.1f} [{v['low'] * 100:+.1f}, {v['high'] * 100:+.1f}]" if v else "-",
                      "-" if not v or v["mcnemar_p"] is None else f"{v['mcnemar_p']:.2f}",
                      f"{v['disagree']}/{v['n']} ({v['disagree_bound']:.1%})" if v else "-",
                      f"{v['induced_errors']} / {m['verify_calls']}" if v else "-", fired)
        console.print(e)
        for c, m in summary["per_condition"].items():
            a = m.get("asks")
            if a:
                console.print(f"{c}: ASKS reused {a['reused']} of {a['prompts']} branch prompts (a donor found for "
                              f"{a['tried']}), computed {a['computed']} of their {a['tokens']} tokens; mean similarity "
                              + ("-" if a["mean_similarity"] is None else f"{a['mean_similarity']:.3f}")
                              + f"; {a['prefill_s']:.1f} s in those prefills, {a['test_s']:.1f} s of it the test")
        replayed = {c: m["replay_vs_rksc"] for c, m in summary["per_condition"].items() if m.get("replay_vs_rksc")}
        if replayed:
            console.print("replayed on rksc's own full runs (what each policy alone changes, no batch noise): " + "; ".join(
                f"{c}: disagree {r['disagree']}/{r['n']} (95% bound {r['bound']:.1%}), steps saved {r['steps_saved']:.0%}, "
                f"tokens saved {r['tokens_saved']:.0%}" for c, r in replayed.items()))
