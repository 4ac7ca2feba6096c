"""Early exit for best-of-N solves (CGEE): policies that read the branches' token streams and stop
branches, or the whole problem, once the selected answer is (or is very likely) already known.

Torch-free. A `Monitor` holds what a policy may see of each branch (its tokens and per-token
confidences so far, and once it ended its answer and weight) and asks its policies after every
decode step which branches to stop. The same code runs online (rksc.reasoning.tree stops the
branches' sequences on the engine) and offline (rksc.bench.replay replays recorded full
runs token by token to pick thresholds), so a threshold means the same thing in both.

Policies (`--early-stop`, several may be combined):
- exact: stop every live branch once no outcome of them can change the selected answer. Vote: the
  leader's count exceeds the runner-up's by more than the live branches; composite: the same with
  weights, each unknown weight in [0, 1] and each live branch adding at most 1. Lossless.
- beta: Adaptive-Consistency's rule: stop once P(leader is the majority answer) under a
  Beta(leader + 1, runner-up + 1) posterior reaches `beta` (0.95 in its paper).
- confidence: DeepConf's online rule without warm-up traces: prune a branch whose mean token
  confidence over the last `window` tokens falls below `prune_below`; stop the problem when the
  confidence-weighted share of the leading answer reaches `tau`. A branch weighs its tail
  confidence (the mean over its last `window` tokens); live branches count in the denominator.
- repeat: prune a branch whose last tokens repeat one span at least `repeats` times (a loop).
- probe: branches get their current answer read by a short forked continuation every `every`
  tokens (rksc.reasoning.tree runs the probes); a branch whose last `stable` probes agree stops
  with that answer, and the problem stops once `agree` branches (finished answers or current
  probes) share one answer.

Policies are consulted at events: when a branch ended, and whenever the live branches reach a
multiple of `CHECK_EVERY` tokens (per-branch checks look only then), so replay can jump from
event to event and still see exactly what the solver sees online.

Every stopped branch carries its reason: consensus, pruned or probe-stable (besides finished
and length). Branches that ended with an answer of their own (finished, length, probe-stable) are
the candidates the answer is selected from; consensus and pruned branches are not.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from rksc import validate
from rksc.errors import RkscError

DECODE_POLICIES = ("exact", "beta", "confidence", "repeat", "probe")
GATES = ("skip", "layers")  # verifier skip (a) and verifier layer exit (b)
NAMES = DECODE_POLICIES + GATES
CALIBRATED = ("confidence", "probe", "skip", "layers")  # no safe threshold without a calibration
STOP_REASONS = ("consensus", "pruned", "probe-stable")
CANDIDATE_REASONS = ("finished", "length", "probe-stable")
CHECK_EVERY = 8  # tokens between per-branch checks (pruning, loops)
# the Thresholds fields each policy reads
FIELDS = {"beta": ("beta",), "confidence": ("window", "prune_below", "tau"), "repeat": ("repeats",),
          "probe": ("every", "stable", "agree"), "skip": ("skip_margin", "skip_confidence"),
          "layers": ("exit_margin", "exit_patience", "exit_min_layer")}


@dataclass
class Thresholds:
    """Every tunable number of the policies and gates; `rksc calibrate` fits the lossy ones."""

    beta: float = 0.95  # beta: posterior probability that the leader is the majority
    window: int = 32  # confidence: sliding window (tokens)
    prune_below: float = -math.inf  # confidence: prune a branch whose window mean falls below this
    tau: float = math.inf  # confidence: stop when the leader's weighted share reaches this
    repeats: int = 8  # repeat: times one span must repeat at the end of a branch
    every: int = 64  # probe: tokens between probes of a branch
    stable: int = 1_000_000  # probe: consecutive equal probes that stop a branch
    agree: int = 1_000_000  # probe: branches that must share one answer to stop the problem
    skip_margin: int = 1_000_000  # skip: vote margin (leader minus runner-up) that skips the verifier
    skip_confidence: float = math.inf  # skip: ... and the leader's branches' mean token probability
    exit_margin: float = math.inf  # layers: |YES/NO margin| of the logit lens that exits
    exit_patience: int = 2  # layers: consecutive layers above the margin
    exit_min_layer: int = 0  # layers: no exit before this layer (early layers' margins mean nothing)

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Thresholds:
        inf = {"prune_below": -math.inf, "tau": math.inf, "skip_confidence": math.inf, "exit_margin": math.inf}
        known = cls.__dataclass_fields__
        return cls(**{k: (inf[k] if v is None and k in inf else v) for k, v in d.items() if k in known})


def check_policies(value) -> tuple[str, ...]:
    """Early-exit policy names: a tuple/list or one comma-separated string; "" or () for none."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RkscError(f"early_stop must be policy names (got {validate.show(value)})")
    allowed = (*NAMES, "cgee")
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise RkscError(f"unknown early-stop policy {validate.show(unknown[0])}; "
                        f"choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(value))


def check_thresholds(value) -> dict:
    """Early-exit thresholds set by hand: a dict or a "field=value,..." string of Thresholds fields
    (e.g. "exit_margin=8,exit_patience=3"); returns {field: number}. Whole-number fields take
    integers; the others finite numbers."""
    show = validate.show
    if isinstance(value, str):
        pairs = {}
        for part in (p.strip() for p in value.split(",") if p.strip()):
            key, eq, raw = part.partition("=")
            if not eq or not key.strip() or not raw.strip():
                raise RkscError("thresholds are field=value pairs separated by commas "
                                f"(got {show(part)})")
            try:
                integral = re.fullmatch(r"\s*[+-]?\d+\s*", raw)
                pairs[key.strip()] = int(raw) if integral else float(raw)
            except ValueError:
                raise RkscError(f"threshold {key.strip()} must be a number "
                                f"(got {show(raw.strip())})") from None
        value = pairs
    if not isinstance(value, dict) or not value:
        raise RkscError(f"thresholds must be field=value pairs (got {show(value)})")
    known = [f for fields in FIELDS.values() for f in fields]
    whole = {f for f in known if isinstance(getattr(Thresholds(), f), int)}
    out = {}
    for key, v in value.items():
        if key not in known:
            raise RkscError(f"unknown threshold {show(key)}; choose from {', '.join(known)}")
        least = 0 if key in ("skip_margin", "exit_min_layer") else 1
        out[key] = validate.integer(key, v, least) if key in whole else validate.number(key, v)
    return out


@dataclass
class BranchView:
    """What policies see of one branch."""

    tokens: list[int] = field(default_factory=list)  # generated so far
    confs: list[float] = field(default_factory=list)  # token confidence of each (when tracked)
    probs: list[float] = field(default_factory=list)  # model probability of each token
    done: bool = False
    reason: str | None = None
    answer: str | None = None  # its own answer once done (or its stable probe)
    weight: float | None = None  # its selection weight once known: verifier score, or confidence
    probes: list[str | None] = field(default_factory=list)  # answers read by probes, in order

    @property
    def candidate(self) -> bool:
        return self.done and self.reason in CANDIDATE_REASONS

    @property
    def confidence(self) -> float:
        return sum(self.probs) / len(self.probs) if self.probs else 0.0


class Exact:
    name = "exact"

    def __init__(self, select: str):
        self.select = select

    def decide(self, views: list[BranchView]) -> list[tuple[int, str]]:
        live = [i for i, v in enumerate(views) if not v.done]
        if not live or not settled(views, self.select):
            return []
        return [(i, "consensus") for i in live]


def settled(views: list[BranchView], select: str) -> bool:
    """True when no outcome of the live branches can change the selected answer."""
    live = sum(not v.done for v in views)
    answered = [v for v in views if v.candidate and v.answer is not None]
    if not answered:
        return live == 0
    if select == "vote":
        counts = Counter(v.answer for v in answered).most_common()
        runner_up = counts[1][1] if len(counts) > 1 else 0
        return counts[0][1] > runner_up + live
    if select == "verifier":  # one branch's weight decides: a live branch could still reach 1
        return live == 0
    low: dict[str, float] = defaultdict(float)
    high: dict[str, float] = defaultdict(float)
    for v in answered:
        low[v.answer] += v.weight if v.weight is not None else 0.0
        high[v.answer] += v.weight if v.weight is not None else 1.0
    leader = max(low, key=lambda a: low[a])
    rival = max((high[a] for a in high if a != leader), default=0.0)
    return low[leader] > rival + live


class Beta:
    name = "beta"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def decide(self, views: list[BranchView]) -> list[tuple[int, str]]:
        live = [i for i, v in enumerate(views) if not v.done]
        counts = Counter(v.answer for v in views if v.candidate and v.answer is not None).most_common(2)
        if not live or not counts:
            return []
        leader, runner_up = counts[0][1], counts[1][1] if len(counts) > 1 else 0
        if majority_probability(leader, runner_up) >= self.threshold:
            return [(i, "consensus") for i in live]
        return []


def majority_probability(leader: int, runner_up: int) -> float:
    """P(p_leader > p_runner_up) with a uniform prior: P(X > 1/2), X ~ Beta(leader+1, runner_up+1).
    For whole counts that is P(Binomial(leader + runner_up + 1, 1/2) <= leader), summed exactly
    in integers (so the core install needs no scipy; within 2e-15 of scipy's betainc)."""
    n = leader + runner_up + 1
    term, total = 1, 0
    for j in range(leader + 1):  # term = comb(n, j)
        total += term
        term = term * (n - j) // (j + 1)
    return total / (1 << n)


class Confidence:
    name = "confidence"

    def __init__(self, window: int, prune_below: float, tau: float):
        self.window, self.prune_below, self.tau = window, prune_below, tau

    def decide(self, views: list[BranchView]) -> list[tuple[int, str]]:
        out = []
        for i, v in enumerate(views):
            if (not v.done and len(v.confs) >= self.window and len(v.confs) % CHECK_EVERY == 0
                    and window_mean(v.confs, self.window) < self.prune_below):
                out.append((i, "pruned"))
        pruned = {i for i, _ in out}
        live = [i for i, v in enumerate(views) if not v.done and i not in pruned]
        if live and leader_share(views, self.window, pruned) >= self.tau:
            out += [(i, "consensus") for i in live]
        return out


def window_mean(confs: list[float], window: int) -> float:
    return sum(confs[-window:]) / window


def leader_share(views: list[BranchView], window: int, exclude: set[int] = frozenset()) -> float:
    """Confidence-weighted share of the leading answer: each branch weighs its tail confidence
    (mean over its last `window` tokens); live branches count in the denominator only."""
    weights: dict[str, float] = defaultdict(float)
    total = 0.0
    for i, v in enumerate(views):
        if i in exclude or (v.done and not v.candidate):
            continue
        tail = v.confs[-window:]
        w = sum(tail) / len(tail) if tail else 0.0
        total += w
        if v.candidate and v.answer is not None:
            weights[v.answer] += w
    if not weights or total <= 0:
        return 0.0
    return max(weights.values()) / total


class Repeat:
    name = "repeat"
    MAX_SPAN = 64  # longest repeating span looked for (tokens)
    MIN_TOKENS = 32  # the repeated part must cover at least this many tokens

    def __init__(self, repeats: int):
        self.repeats = repeats

    def decide(self, views: list[BranchView]) -> list[tuple[int, str]]:
        return [(i, "pruned") for i, v in enumerate(views)
                if not v.done and len(v.tokens) % CHECK_EVERY == 0 and looping(v.tokens, self.repeats, self.MAX_SPAN,
                                                                     self.MIN_TOKENS)]


def looping(tokens: list[int], repeats: int, max_span: int = 64, min_tokens: int = 32) -> bool:
    """True when the tokens end with one span of 1..max_span tokens repeated at least `repeats`
    times and over at least `min_tokens` tokens."""
    n = len(tokens)
    for span in range(1, max_span + 1):
        size = max(span * repeats, min_tokens)
        if size > n:
            if span * repeats > n:
                break
            continue
        tail = tokens[n - size:]
        if all(tail[j] == tail[j - span] for j in range(span, size)):
            return True
    return False


class Probe:
    name = "probe"

    def __init__(self, stable: int, agree: int):  # the probes themselves run every `every` tokens (tree)
        self.stable, self.agree = stable, agree

    def decide(self, views: list[BranchView]) -> list[tuple[int, str]]:
        out = []
        for i, v in enumerate(views):
            last = v.probes[-self.stable:]
            if not v.done and len(last) == self.stable and last[0] is not None and len(set(last)) == 1:
                out.append((i, "probe-stable"))
        stable = {i for i, _ in out}
        current = [v.answer if v.done else (v.probes[-1] if v.probes else None)
                   for v in views if v.candidate or not v.done]
        counts = Counter(a for a in current if a is not None).most_common(1)
        if counts and counts[0][1] >= self.agree:
            out += [(i, "probe-stable") for i, v in enumerate(views)
                    if not v.done and i not in stable and v.probes and v.probes[-1] is not None]
            out += [(i, "consensus") for i, v in enumerate(views)
                    if not v.done and i not in stable and not (v.probes and v.probes[-1] is not None)]
        return out


def build(names: tuple[str, ...], thresholds: Thresholds, select: str) -> list:
    """The decode policies among `names`, in a fixed order."""
    t = thresholds
    make = {"exact": lambda: Exact(select), "beta": lambda: Beta(t.beta),
            "confidence": lambda: Confidence(t.window, t.prune_below, t.tau), "repeat": lambda: Repeat(t.repeats),
            "probe": lambda: Probe(t.stable, t.agree)}
    return [make[n]() for n in DECODE_POLICIES if n in names]


@dataclass
class Fired:
    policy: str
    reason: str
    branches: list[int]
    tokens: int  # the longest live branch's tokens when it fired


class Monitor:
    """The state of one problem's branches and the policies that may stop them."""

    def __init__(self, branches: int, policies: list):
        self.views = [BranchView() for _ in range(branches)]
        self.policies = policies
        self.fired: list[Fired] = []
        self._ended = False  # a branch ended since the last decision

    @property
    def live(self) -> list[int]:
        return [i for i, v in enumerate(self.views) if not v.done]

    def end(self, i: int, reason: str, answer: str | None = None, weight: float | None = None) -> None:
        v = self.views[i]
        v.done, v.reason = True, reason
        v.answer = answer if reason in CANDIDATE_REASONS else None
        if weight is not None:
            v.weight = weight
        self._ended = True

    def event(self) -> bool:
        """Whether policies would look now: a branch ended, or a live one is at a check point."""
        return self._ended or any(not v.done and v.tokens and len(v.tokens) % CHECK_EVERY == 0 for v in self.views)

    def decide(self) -> list[tuple[int, str]]:
        """At an event, ask every policy in turn; the branches they stop are ended here and returned."""
        if not self.event():
            return []
        self._ended = False
        stops = []
        for policy in self.policies:
            if not self.live:
                break
            actions = [(i, r) for i, r in policy.decide(self.views) if not self.views[i].done]
            if not actions:
                continue
            longest = max(len(self.views[i].tokens) for i in self.live)
            for reason in dict.fromkeys(r for _, r in actions):
                self.fired.append(Fired(policy.name, reason, [i for i, r in actions if r == reason], longest))
            for i, reason in actions:
                v = self.views[i]
                answer = v.probes[-1] if reason == "probe-stable" else None
                self.end(i, reason, answer)
                stops.append((i, reason))
        self._ended = False
        return stops

    def probed(self, i: int, answer: str | None) -> None:
        """A probe read branch i's current answer: an event."""
        self.views[i].probes.append(answer)
        self._ended = True

    def weigh(self, i: int, weight: float) -> None:
        """A branch's weight (its verifier score) arrived after it ended: an event."""
        self.views[i].weight = weight
        self._ended = True


def skip_verifier(views: list[BranchView], thresholds: Thresholds) -> bool:
    """Gate (a): the vote among the candidates is decisive enough to select without the verifier."""
    answered = [v for v in views if v.candidate and v.answer is not None]
    counts = Counter(v.answer for v in answered).most_common()
    if not counts:
        return False
    margin = counts[0][1] - (counts[1][1] if len(counts) > 1 else 0)
    leader = [v.confidence for v in answered if v.answer == counts[0][0]]
    return margin >= thresholds.skip_margin and sum(leader) / len(leader) >= thresholds.skip_confidence
