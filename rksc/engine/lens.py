"""The verifier's logit lens, and layer exit: the YES/NO verdict read part-way through the model.

`LogitLens(model, yes_ids, no_ids).margin(hidden)` applies the model's own final norm to hidden
states and reads only the YES and NO rows of the unembedding, in float32:

    margin = logsumexp(yes logits) - logsumexp(no logits)

so sigmoid(margin) = P(YES) / (P(YES) + P(NO)) of the full softmax (its normaliser over the
vocabulary cancels). On the last layer's output it is the model's own verdict.

A `LayerWatch` follows the last token of each prompt of one prefill step through the decoder
layers (`watching` hooks them): a row exits after the first layer, from `min_layer` on, at which
its margin has been decisive (|margin| >= threshold) for `patience` consecutive layers. When the step may stop and
every row has exited, the hook raises `AllExited` out of the forward: the later layers never run.
Only a whole step stops; a row that exits while others still run costs the remaining layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from rksc.engine.sequence import LayerExit
from rksc.models.weights import dense_weight


class LogitLens:
    def __init__(self, model, yes_ids: Sequence[int], no_ids: Sequence[int]):
        cfg = model.config.get_text_config()
        self.norm = model.get_decoder().norm
        head = model.get_output_embeddings()
        assert getattr(head, "bias", None) is None, "an unembedding with a bias"
        weight = dense_weight(head)  # packed formats hold their weight in a blocked layout
        self.rows = weight[[*yes_ids, *no_ids]].float()  # [Y + N, H]
        self.num_yes = len(yes_ids)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma: cap * tanh(logits / cap)

    @torch.inference_mode()
    def margin(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, H] hidden states (a decoder layer's output) -> [R] float32 YES/NO margins."""
        logits = self.norm(hidden.float()) @ self.rows.T  # [R, Y + N]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        yes, no = logits[:, :self.num_yes], logits[:, self.num_yes:]
        return torch.logsumexp(yes, -1) - torch.logsumexp(no, -1)


class AllExited(Exception):
    """Raised from a layer's hook to skip the later layers: every row of the step has exited."""


class LayerWatch:
    """The lens margins of one prefill step's finishing rows, layer by layer, and where each exits.
    `can_stop`: the step may skip the later layers (every row of the step ends with it)."""

    def __init__(self, lens: LogitLens, exits: list[LayerExit], can_stop: bool):
        self.lens, self.exits, self.can_stop = lens, exits, can_stop
        self.margins: list[list[float]] = [[] for _ in exits]  # per row: the margin after each layer run
        self.exit_layer: list[int | None] = [None] * len(exits)
        self._streak = [0] * len(exits)

    @property
    def layers_run(self) -> int:
        return len(self.margins[0])

    def score(self, row: int) -> float | None:
        """sigmoid(margin) after the row's exit layer; None if it did not exit."""
        layer = self.exit_layer[row]
        return None if layer is None else float(torch.sigmoid(torch.tensor(self.margins[row][layer])))

    def observe(self, layer: int, hidden: torch.Tensor) -> bool:
        """Record the margins of `hidden` ([R, H], the rows' last tokens after `layer`); returns
        whether the step may stop here."""
        for i, (m, rule) in enumerate(zip(self.lens.margin(hidden).tolist(), self.exits)):
            self.margins[i].append(m)
            self._streak[i] = self._streak[i] + 1 if abs(m) >= rule.threshold else 0
            if self.exit_layer[i] is None and self._streak[i] >= rule.patience and layer >= rule.min_layer:
                self.exit_layer[i] = layer
        return self.can_stop and None not in self.exit_layer


@contextmanager
def watching(layers: Sequence[nn.Module], watch: LayerWatch, rows: torch.Tensor) -> Iterator[None]:
    """Let `watch` observe the output of every layer at packed token positions `rows`; raises
    `AllExited` from a layer before the last once the step may stop. The hooks go in every case."""
    def hook(index: int):
        def observe(module, args, hidden):  # hidden: [1, N, H], the layer's output
            if watch.observe(index, hidden[0, rows]) and index < len(layers) - 1:
                raise AllExited
        return observe

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
