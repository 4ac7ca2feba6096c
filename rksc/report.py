"""Readable tables for the terminal (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from rksc.models import registry
from rksc.models.compute import KERNELS
from rksc.paths import rksc_home


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MB"


def print_result(result, console: Console | None = None) -> None:
    console = console or Console()
    tree = result.config.depth > 1
    shape = f"tree depth {result.config.depth}, keep {result.config.keep}, " if tree else ""
    t = Table(title=f"{result.model}: {shape}{len(result.branches)} candidates, "
                    f"{result.prefix_tokens}-token shared prefix")
    cols = [("#", "right"), ("hint", "left"), ("answer", "right"), ("confidence", "right"),
            ("verifier", "right"), ("tokens", "right"), ("stop", "center")]
    if tree:
        cols.insert(1, ("depth<-parent", "right"))
    for col, justify in cols:
        t.add_column(col, justify=justify)
    for b in result.branches:
        mark = "*" if b.index == result.chosen else ""
        cells = [f"{mark}{b.index}", b.hint, b.answer or "-", f"{b.confidence:.3f}",
                 "-" if b.verifier is None else f"{b.verifier:.3f}", str(b.tokens), b.stop_reason or "-"]
        if tree:
            cells.insert(1, f"{b.depth}<-{'-' if b.parent is None else b.parent}")
        t.add_row(*cells)
    console.print(t)
    tm, kv = result.timing, result.kv_bytes
    timing = Table(title="time and memory")
    timing.add_column("stage")
    timing.add_column("value", justify="right")
    timing.add_column("share", justify="right")
    for stage, sec in (("prefill", tm.prefill_s), ("decode", tm.decode_s), ("verify", tm.verify_s)):
        timing.add_row(stage, f"{sec:.2f} s", f"{sec / tm.total_s:.0%}" if tm.total_s else "-")
    timing.add_row("total", f"{tm.total_s:.2f} s", "")
    timing.add_row("decode speed", f"{tm.decode_tok_s:.1f} tok/s", f"{tm.new_tokens} tokens")
    for key, label in (("prefix", "KV prefix"), ("decode_peak", "KV held, decode"), ("verify_peak", "KV held, verify")):
        if key in kv:
            timing.add_row(label, _mb(kv[key]), "")
    if kv.get("prefix_cached_tokens"):
        timing.add_row("prefix index hit", f"{kv['prefix_cached_tokens']} tokens", "reused, not computed")
    if "server_cached_tokens" in kv:  # a remote backend: the KV is the server's, only its cache hits are seen
        timing.add_row("server prefix cache hit", f"{kv['server_cached_tokens']} tokens", "KV held on the server")
    console.print(timing)
    early = getattr(result, "early", None)
    if early:
        fired = "; ".join(f"{f['policy']} stopped {len(f['branches'])} branch(es) ({f['reason']}) at {f['tokens']} tokens"
                          for f in early["fired"]) or "nothing fired"
        extra = []
        if early["kv_freed_bytes"]:
            extra.append(f"KV freed {_mb(early['kv_freed_bytes'])}")
        if early["verifier_skipped"]:
            extra.append("verifier skipped")
        if early.get("exit_layers"):
            extra.append("verifier exit layers " + ", ".join(
                "-" if v is None else str(v) for v in early["exit_layers"].values()))
        if early.get("probe"):
            extra.append(f"{early['probe']['probes']} probes, {early['probe']['tokens']} probe tokens")
        if early.get("by_hand"):
            extra.append(f"thresholds set by hand (uncalibrated): {', '.join(early['by_hand'])}")
        console.print(f"early exit ({', '.join(early['policies'])}): {fired}" + (f"; {'; '.join(extra)}" if extra else ""))
    gold = "" if result.gold is None else f"   (gold {result.gold}: {'correct' if result.correct else 'wrong'})"
    console.print(f"[bold]answer: {result.answer if result.answer is not None else 'none found'}[/bold]"
                  f"   (branch {result.chosen}, select={result.config.select}){gold}")


def print_models(console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"models (cache: {rksc_home() / 'models'})")
    for col in ("name", "family", "params", "instruct", "prepared", "size on disk"):
        t.add_column(col)
    notes = []
    for name, r in registry.MODELS.items():
        state = registry.check(name)
        size = _mb(registry.dir_size(registry.model_dir(name))) if state.status != "absent" else "-"
        mark = " (default)" if name == registry.DEFAULT_MODEL else ""
        prepared = {"ready": "yes", "absent": "no", "damaged": "DAMAGED"}[state.status]
        t.add_row(name + mark, r.family, r.params, "yes" if r.instruct else "no", prepared, size)
        if state.damaged:
            notes.append(f"{name} is damaged ({state.problem}); repair it with: {state.repair}")
        elif state.ready and not state.recorded:
            notes.append(f"{name} was prepared by an older rksc without a record of its files; "
                         f"`rksc models verify {name}` checks it and records one")
    console.print(t)
    for note in notes:
        console.print(note, markup=False, highlight=False)


def print_info(info: dict, console: Console | None = None) -> None:
    """`rksc info`: the machine, the choice for it and why, each weight format, and timings if measured."""
    console = console or Console()
    m = info["machine"]
    console.print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['threads']} threads", markup=False)
    console.print(f"kind:    {m['kind']} (torch dispatches {m['torch_isa']}; flags: "
                  f"{' '.join(m['flags']) or 'none of interest'})", markup=False)
    kernels = [f"oneDNN packed bf16 {'runs' if m['bf16_packed'] else 'does not run'}",
               f"rksc fp16 kernel {'runs' if m['rksc_fp16'] == 'ok' else 'does not run (' + m['rksc_fp16'] + ')'}",
               f"fbgemm fp16 {'runs' if m['fbgemm_fp16'] else 'does not run'}"]
    console.print("kernels: " + "; ".join(kernels), markup=False)
    asked, chosen = info["asked"], info["chosen"]
    console.print(f"\n--dtype {asked['dtype']} --weights {asked['weights']} -> {chosen['dtype']}, "
                  f"{chosen['weights']} weights, {KERNELS[chosen['kernel']]}", markup=False)
    for reason in chosen["reasons"]:
        console.print(f"  {reason}", markup=False)
    t = Table(title="weight formats here")
    for col in ("weights", "runs", "dtype", "kernel", "bytes/weight", "exact"):
        t.add_column(col)
    for f in info["formats"]:
        t.add_row(f["weights"], "yes" if f["runs"] else "no", f["dtype"], f["kernel"] or "-", str(f["bytes"]),
                  "yes" if f["exact"] else "no")
    console.print(t)
    for f in info["formats"]:
        if f["note"]:
            console.print(f"{f['weights']}: {f['note']}", markup=False)
    console.print("\nASKS (approximate KV reuse) with --asks auto, the default:", markup=False)
    for name, a in info.get("asks", {}).items():
        console.print(f"  {name}: {'on' if a['on'] else 'off'}, {a['why']}", markup=False)
    if info.get("timings"):
        rows = sorted({x["rows"] for x in info["timings"]})
        fmts = list(dict.fromkeys(x["weights"] for x in info["timings"]))
        t = Table(title="ms per product of one 4864x896 layer (Qwen2.5-0.5B's MLP), weights streamed from memory")
        t.add_column("rows", justify="right")
        for f in fmts:
            t.add_column(f, justify="right")
        by = {(x["weights"], x["rows"]): x for x in info["timings"]}
        for r in rows:
            t.add_row(str(r), *[f"{by[f, r]['ms']:.2f} ({by[f, r]['gflops']:.0f} GFLOP/s)" for f in fmts])
        console.print(t)
