"""Flag groups several commands share (compute, backend, early-exit thresholds, eviction, ASKS,
Ray) and their help. Imports nothing heavy, so `rksc --help` needs no torch."""

from __future__ import annotations

import argparse

from rksc import validate
from rksc.cache.policies import DEFAULT_POLICY, POLICIES
from rksc.errors import RkscError

MODEL = "registry name, Hugging Face folder or .gguf file"
MODEL_OR_DEFAULT = MODEL + " (default: qwen2.5-coder-0.5b)"
THREADS = "torch threads (default: all cores)"
KV_BUDGET = "bytes for the KV block pool, e.g. 2G or 512M (default: 1/4 of free memory)"


def compute(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=validate.DTYPES,
                   help="activations and KV cache: auto (default: bfloat16 on CPUs with bf16 "
                        "matrix units, float32 on others), bfloat16, float32 or float16")
    p.add_argument("--weights", default="auto", choices=validate.WEIGHTS,
                   help="weight format: auto (default: the fastest exact one here, see `rksc "
                        "info`), fp32, bf16 (needs AMX or AVX-512-BF16), fp16 (AVX2; fp32 "
                        "products) or int8 (AVX2; lossy, one step per row)")


def backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=None, metavar="URL",
                   help="run on an OpenAI-compatible server (rksc serve, vLLM, SGLang, llama.cpp) "
                        "at URL, e.g. http://127.0.0.1:8000/v1; --model then names its tokenizer "
                        "(registry name or folder)")
    p.add_argument("--backend-model", default=None,
                   help="the model's id on the server (default: the only one)")
    p.add_argument("--api-key", default=None,
                   help="bearer token for --backend (default: $OPENAI_API_KEY)")


def thresholds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--thresholds", default=None, metavar="FIELD=VALUE,...",
                   help="early-exit thresholds set by hand on top of the model's calibration "
                        "profile, e.g. exit_margin=8,exit_patience=3,exit_min_layer=18; the "
                        "policies they touch run uncalibrated (no disagreement bound) and results "
                        "say so")


def evict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--evict", default=DEFAULT_POLICY, choices=tuple(POLICIES),
                   help="which cached KV block leaves first when the pool is full (default "
                        f"{DEFAULT_POLICY}): leaf (least recently used, a chain's last block "
                        "first), lru (least recently used), rksc (least attention / (depth + 1))")


def asks(p: argparse.ArgumentParser, switch: bool = True) -> None:
    if switch:
        p.add_argument("--asks", default="auto", choices=validate.ASKS,
                       help="approximate KV reuse for prompts that are not token-identical: auto "
                            "(default) is on where the model's calibration passed its answer guard "
                            "(`rksc asks-calibrate`; `rksc info` says which), on uses the "
                            "calibrated tau or --asks-tau")
    p.add_argument("--asks-tau", type=float, default=None,
                   help="ASKS similarity threshold in [0, 1] (default: the model's calibration; "
                        "above 1 never reuses); given, it turns --asks auto on")
    p.add_argument("--asks-recompute", type=float, default=None,
                   help="ASKS: fraction of reused tokens recomputed anyway (default: the "
                        "calibration's, else 0.15)")


def ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="fan out over a Ray cluster, one worker per node (or per --threads "
                        "cores): no ADDRESS starts a local cluster, 'auto' joins the one `ray "
                        "start` runs here (pip install 'rksc[ray]')")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="with --ray: this many workers, spread over the nodes (default: one per "
                        "node, or one per --threads cores)")


def size(text: str) -> int:
    try:
        return validate.parse_size(text)
    except RkscError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
