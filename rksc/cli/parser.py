"""Every command's flags and help. Imports nothing heavy, so `rksc --help` needs no torch."""

from __future__ import annotations

import argparse

from rksc import validate
from rksc.bench.conditions import CONDITIONS, DEFAULT_CONDITIONS
from rksc.bench.datasets import DATASETS
from rksc.bench.workloads import WORKLOADS
from rksc.cli import flags
from rksc.errors import RkscError
from rksc.reasoning.select import METHODS


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would also print the usage block)
        raise RkscError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rksc", description="Fast multi-branch LLM reasoning on CPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, about, add in [
        ("solve", "solve a problem with B branches, a verifier and selection", _solve),
        ("models", "list or prepare the registry models", _models),
        ("bench", "run baselines and rksc side by side on a dataset", _bench),
        ("calibrate", "fit early-exit thresholds on a calibration split", _calibrate),
        ("serve", "an OpenAI-compatible HTTP server (completions, chat, solve)", _serve),
        ("info", "this machine, the dtype, weight format and kernels rksc runs here, and why",
         _info),
        ("asks-curve", "ASKS: reuse rate, time saved and token-level fidelity per tau and recompute "
                       "fraction", _asks_curve),
        ("asks-calibrate", "ASKS: the setting that changes no selected answer on a calibration split "
                           "(the model's default)", _asks_calibrate),
    ]:
        add(sub.add_parser(name, help=about))
    return parser


def _solve(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", nargs="?", help="the problem text (or use --file)")
    p.add_argument("--file", help="JSONL file, one {\"question\": ..., \"answer\": optional gold} "
                                  "per line")
    p.add_argument("--out", help="with --file: write one JSON result per line here "
                                 "(default: stdout)")
    p.add_argument("--model", default=None, help=flags.MODEL_OR_DEFAULT)
    flags.compute(p)
    p.add_argument("--threads", type=int, default=None, help=flags.THREADS)
    flags.backend(p)
    p.add_argument("--branches", "-b", type=int, default=8, help="reasoning branches per problem")
    p.add_argument("--max-new-tokens", "-n", type=int, default=512,
                   help="token cap per branch (default 512: most branches end on their own "
                        "before it)")
    p.add_argument("--select", default="composite", choices=METHODS,
                   help="how one branch is chosen")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed; branch i uses (seed, i)")
    p.add_argument("--no-hints", dest="hints", action="store_false",
                   help="same instruction for every branch (use with --temperature > 0)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the verifier")
    p.add_argument("--cache", default="pool", choices=validate.CACHES,
                   help="pool: paged KV blocks, prefix held once (default); shared: prefix copied "
                        "per row; none: No-KV baseline")
    p.add_argument("--kv-budget", type=flags.size, default=None, help=flags.KV_BUDGET)
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    flags.evict(p)
    p.add_argument("--answer-format", default="auto", choices=validate.ANSWER_FORMATS)
    p.add_argument("--verifier", default="auto", choices=validate.VERIFIERS,
                   help="continue: ask on top of each branch's own KV (pool); prompt: the paper's "
                        "separate verification prompt; auto: continue on the pool, else prompt")
    p.add_argument("--depth", type=int, default=1,
                   help="tree of thoughts depth (1 = plain best-of-B)")
    p.add_argument("--keep", type=int, default=2,
                   help="tree: nodes kept and expanded at each depth")
    p.add_argument("--concurrency", "-k", type=int, default=None,
                   help="with --file: problems in flight on the engine, sharing each decode step "
                        "(default: as many as make about 32 decode rows, e.g. 4 at 8 branches)")
    p.add_argument("--early-stop", default="",
                   help="early exit, comma-separated: exact (lossless), beta, confidence, repeat, "
                        "probe, skip (verifier skip), layers (verifier layer exit), or cgee (the "
                        "model's calibrated combination, see `rksc calibrate`)")
    flags.thresholds(p)
    flags.asks(p)
    p.add_argument("--layout", default="shared", choices=validate.LAYOUTS,
                   help="shared: one problem prefix, a hint after it per branch (default); "
                        "diverse: each branch its own instruction before the problem (exact "
                        "prefix caching then shares only the chat template's head; see --asks)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    flags.ray(p)


def _models(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_command", required=True, parser_class=Parser)
    sub.add_parser("list", help="name, family, size and whether prepared")
    pull = sub.add_parser("pull", help="download, verify and convert a model once")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="prepare again even if present")
    pull.add_argument("--keep-gguf", action="store_true",
                      help="also keep the source GGUF file (sha256-verified) in $RKSC_HOME/gguf, "
                           "e.g. to run the same weights on llama.cpp")
    verify = sub.add_parser(
        "verify", help="check every file of a prepared model against its recorded sha256")
    verify.add_argument("name")


def _bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=flags.MODEL)
    flags.compute(p)
    flags.backend(p)
    p.add_argument("--dataset", default="gsm8k", choices=DATASETS)
    p.add_argument("--offset", type=int, default=0,
                   help="first problem (deterministic file order)")
    p.add_argument("--limit", type=int, default=10, help="number of problems")
    p.add_argument("--conditions", default=",".join(DEFAULT_CONDITIONS),
                   help=f"comma-separated, from {', '.join(CONDITIONS)}")
    p.add_argument("--regime", default="paper", choices=("paper", "natural"),
                   help="paper: prefix padded to --prefix-tokens, 32 new tokens; natural: no "
                        "padding, 512")
    p.add_argument("--prefix-tokens", type=int, default=None,
                   help="paper regime prefix length (1024)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=None)
    p.add_argument("--branches", "-b", type=int, default=8)
    p.add_argument("--select", default="composite")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None,
                   help="output folder (default runs/bench-<model>-<dataset>-<regime>)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--concurrency", "-k", type=int, default=1,
                   help="problems in flight for the engine conditions (rksc, kv-only); the "
                        "baselines always run one problem at a time; with K > 1 conditions "
                        "interleave per block of 2K problems")
    p.add_argument("--warm-index", action="store_true",
                   help="let the pool's prefix index keep blocks across runs (default: every run "
                        "starts cold, so no condition reuses KV computed by another)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores; with --ray: per worker, default all "
                        "of its node's cores)")
    p.add_argument("--workload", default="standard", choices=WORKLOADS,
                   help="standard: one problem prefix shared by the branches; diverse: each "
                        "branch its own instruction before the problem; fewshot: its own 3 "
                        "worked examples; rag: the same 4 passages in its own order; chat-edit: "
                        "an earlier chat turn, edited differently per branch (compare rksc, asks "
                        "and nokv; see rksc/bench/workloads.py)")
    flags.thresholds(p)
    flags.asks(p, switch=False)
    flags.ray(p)


def _calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=flags.MODEL)
    flags.compute(p)
    p.add_argument("--dataset", default="gsm8k", help="gsm8k (default)")
    p.add_argument("--offset", type=int, default=None,
                   help="first problem of the split (gsm8k: 1019)")
    p.add_argument("--limit", type=int, default=None, help="problems in the split (gsm8k: 300)")
    p.add_argument("--split", default=None, metavar="FIRST-LAST",
                   help="the split as problem indices, both included (gsm8k: 1019-1318); instead "
                        "of --offset/--limit")
    p.add_argument("--branches", "-b", type=int, default=8)
    p.add_argument("--max-new-tokens", "-n", type=int, default=512)
    p.add_argument("--select", default="composite")
    p.add_argument("--concurrency", "-k", type=int, default=4,
                   help="problems in flight while recording")
    p.add_argument("--target", type=float, default=0.01,
                   help="highest disagreement with full computation allowed (its 95%% upper "
                        "bound)")
    p.add_argument("--out", default=None, help="folder for traces.jsonl and fit.json "
                                               "(default runs/calibrate-<model>-<dataset>)")
    p.add_argument("--profile", default=None,
                   help="where to save the profile (default $RKSC_HOME/profiles/<model>.json)")
    p.add_argument("--record-only", action="store_true", help="record the full runs, do not fit")
    p.add_argument("--order-from", default=None, metavar="FOLDER",
                   help="learn the order in which settings are tested from the runs another `rksc "
                        "calibrate` recorded on other problems (same model and settings); this "
                        "split then confirms it")
    p.add_argument("--no-layers", dest="layers", action="store_false",
                   help="do not ask the verifier questions again to record lens margins (traces "
                        "recorded without them); the layers gate then stays uncalibrated")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="do not probe the branches' current answers while recording (faster); the "
                        "probe policy then stays uncalibrated")


def _asks_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=flags.MODEL)
    flags.compute(p)
    p.add_argument("--threads", type=int, default=None, help=flags.THREADS)
    p.add_argument("--offset", type=int, default=1019,
                   help="first GSM8K test problem of the split (1019: the early-exit calibration "
                        "split, outside every evaluation range)")
    p.add_argument("--limit", type=int, default=300,
                   help="problems in the split (300; a 1%% bound needs at least 299)")
    p.add_argument("--branches", "-b", type=int, default=8)
    p.add_argument("--max-new-tokens", "-n", type=int, default=512)
    p.add_argument("--prefix-tokens", type=int, default=1024,
                   help="filler before each problem, so that prompts are long (1024; 0: none); every "
                        "branch writes its own instruction before it (the diverse workload)")
    p.add_argument("--concurrency", "-k", type=int, default=4, help="problems in flight")
    p.add_argument("--target", type=float, default=0.01,
                   help="highest share of changed answers allowed (its 95%% upper bound)")
    p.add_argument("--out", default=None,
                   help="folder for answers.jsonl and report.json (default runs/asks-calibrate-<model>); "
                        "a rerun with the same folder solves only what is missing")
    p.add_argument("--save", nargs="?", const="", default=None, metavar="PATH",
                   help="save the outcome as the model's ASKS calibration (default path "
                        "$RKSC_HOME/profiles/<model>.asks.json): --asks auto then follows it")


def _serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=flags.MODEL_OR_DEFAULT)
    flags.compute(p)
    p.add_argument("--threads", type=int, default=None, help=flags.THREADS)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests in flight (waiting or running) before new ones get 429 "
                        "(default 64)")
    p.add_argument("--kv-budget", type=flags.size, default=None, help=flags.KV_BUDGET)
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    flags.evict(p)
    p.add_argument("--max-rows", type=int, default=64, help="sequences decoded together at most")
    p.add_argument("--max-solve-tokens", type=int, default=1 << 20,
                   help="the most tokens one /v1/solve may ask to decode: branches x max_tokens, "
                        "times the nodes a tree adds (default 1048576); a larger request gets 400")
    p.add_argument("--api-key", default=None,
                   help="every endpoint but /health then needs 'Authorization: Bearer KEY' "
                        "(default: $RKSC_API_KEY; none: no key asked)")
    flags.asks(p)


def _info(p: argparse.ArgumentParser) -> None:
    flags.compute(p)
    p.add_argument("--measure", action="store_true",
                   help="time every weight format that runs here on one layer (1, 8, 32 and 512 "
                        "rows)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _asks_curve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=flags.MODEL)
    flags.compute(p)
    p.add_argument("--threads", type=int, default=None, help=flags.THREADS)
    p.add_argument("--recompute", default="0,0.15,0.3",
                   help="recompute fractions to sweep, comma-separated")
    p.add_argument("--tokens", type=int, default=32,
                   help="greedy tokens compared with full recompute")
    p.add_argument("--min-run", type=int, default=8,
                   help="shortest run of identical tokens reused")
    p.add_argument("--probe-layer", type=int, default=1,
                   help="layer whose KV the similarity test compares (layers 0..L run on every "
                        "token; default 1)")
    p.add_argument("--problems", type=int, default=None,
                   help="problems per dataset in each split (default: 16 GSM8K and 8 "
                        "ARC-Challenge)")
    p.add_argument("--out", default=None, help="output folder (default runs/asks-curve-<model>)")
