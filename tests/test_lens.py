"""The logit lens reads the model's own YES/NO margin, and layer exit on the engine: with an infinite
threshold nothing changes, a decisive margin skips the later layers (counted), the blocks of a step
that stopped early are never reused, and the lens hooks go even when the forward raises."""

import contextlib
import math

import pytest
import torch

from conftest import TINY_FAMILIES, tiny_model
from rksc.engine.engine import Engine
from rksc.engine.lens import LogitLens
from rksc.engine.sequence import LayerExit, Sequence
from rksc.engine.verifier import Verifier

YES, NO = [5, 17, 40], [6, 33]  # several spellings of each word, as word_token_ids finds them
LAYERS = 4


class WordTokenizer:
    """Some spellings of yes and no are one token each; the others are two tokens."""

    words = {"YES": 5, " YES": 17, "yes": 40, "NO": 6, " no": 33}

    def encode(self, text, add_special_tokens=False):
        return [self.words[text]] if text in self.words else [90, 91]

    def decode(self, ids):
        return {i: w for w, i in self.words.items()}.get(ids[0], "?")


def verifier() -> Verifier:
    v = Verifier(None, WordTokenizer())
    assert v.yes.tolist() == YES and v.no.tolist() == NO
    return v


def rand(n, seed):
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def model_logits(model, ids) -> torch.Tensor:
    """The plain model's next-token logits after `ids` ([V])."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def full_margin(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits[..., YES], -1) - torch.logsumexp(logits[..., NO], -1)


@contextlib.contextmanager
def layer_calls(model):
    """Counts of decoder layer calls while the block runs."""
    counts = [0] * len(model.get_decoder().layers)

    def counter(i):
        def count(module, args):
            counts[i] += 1
        return count

    handles = [layer.register_forward_pre_hook(counter(i)) for i, layer in enumerate(model.get_decoder().layers)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def engine_for(model, **kw):
    return Engine(model, kv_budget=1 << 22, block_size=4, lens=LogitLens(model, YES, NO), **kw)


def ask(engine, prefix_ids, question, layer_exit):
    """A held problem prefix, then a verifier question forking it; returns (prefix, question)."""
    prefix = engine.add(Sequence(prefix_ids, hold=True))
    while not prefix.finished:
        engine.step()
    seq = engine.add(Sequence(prefix_ids + question, parent=prefix, keep_logits=True, layer_exit=layer_exit))
    return prefix, seq


def drain(engine):
    while engine.has_work:
        engine.step()
        engine.check()


@pytest.mark.parametrize("family", [*TINY_FAMILIES, "gemma3-softcap"])
def test_lens_after_the_last_layer_is_the_models_own_margin(family):
    model = tiny_model(family.removesuffix("-softcap"), layers=LAYERS).float()
    if family.endswith("softcap"):
        model.config.final_logit_softcapping = 2.0  # read by the model's forward and by the lens
    lens = LogitLens(model, YES, NO)
    last = {}
    handle = model.get_decoder().layers[-1].register_forward_hook(lambda m, a, out: last.update(h=out))
    with torch.no_grad():
        logits = model(torch.tensor([rand(23, 1)])).logits[0].float()  # [T, V]
    handle.remove()
    margins = lens.margin(last["h"][0])
    assert torch.allclose(margins, full_margin(logits), atol=1e-5, rtol=0)
    scores = torch.sigmoid(margins)
    assert torch.allclose(scores, torch.tensor(verifier().score_logits(logits)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_lens_reads_a_packed_unembedding(fmt):
    from rksc.kernels.machine import probe
    from rksc.models import weights

    if fmt == "bf16" and not probe().bf16_packed:
        pytest.skip("no packed bf16 kernels on this CPU")
    if fmt == "fp16" and probe().rksc_fp16 is not None and not probe().fbgemm_fp16:
        pytest.skip("no fp16 kernel on this CPU")
    model = tiny_model("llama").to(torch.bfloat16)
    assert not model.config.tie_word_embeddings
    plain = LogitLens(model, YES, NO)
    kernel = "rksc" if probe().rksc_fp16 is None else "fbgemm"
    assert weights.convert(model, fmt, kernel) > 0 and not isinstance(model.lm_head, torch.nn.Linear)
    assert torch.equal(LogitLens(model, YES, NO).rows, plain.rows)


@pytest.mark.slow
def test_smollm2_layer_margins_end_with_its_own_verdict(smollm2):
    from rksc.engine.verifier import word_token_ids

    model, tok = smollm2.model, smollm2.tokenizer
    yes, no = word_token_ids(tok, "yes"), word_token_ids(tok, "no")
    engine = Engine(model, kv_budget=1 << 26, lens=LogitLens(model, yes, no))
    ids = tok.encode("Question: Is 17 a prime number? Answer YES or NO.\nAnswer:")
    seq = engine.add(Sequence(ids, keep_logits=True, layer_exit=LayerExit(math.inf)))
    drain(engine)
    logits = model_logits(model, ids)
    own = float(torch.logsumexp(logits[yes], -1) - torch.logsumexp(logits[no], -1))
    assert len(seq.out.lens.margins) == model.config.num_hidden_layers
    assert seq.out.lens.margins[-1] == pytest.approx(own, abs=1e-3)
    assert seq.out.lens.exit_layer is None and torch.allclose(seq.out.logits, logits, atol=1e-3)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_infinite_threshold_records_every_layer_and_changes_nothing(family):
    model = tiny_model(family, layers=LAYERS)
    prefix_ids, question = rand(30, 2), rand(9, 3)
    runs = {}
    for layer_exit in (None, LayerExit(math.inf)):
        engine = engine_for(model)
        _, seq = ask(engine, prefix_ids, question, layer_exit)
        drain(engine)
        runs[layer_exit] = (engine, seq)
    _, plain = runs[None]
    engine, seq = runs[LayerExit(math.inf)]
    assert torch.equal(seq.out.logits, plain.out.logits)
    assert verifier().score_logits(seq.out.logits[None]) == verifier().score_logits(plain.out.logits[None])
    assert seq.out.lens.exit_layer is None and seq.out.lens.score is None and len(seq.out.lens.margins) == LAYERS
    assert seq.out.lens.margins[-1] == pytest.approx(float(full_margin(seq.out.logits)), abs=1e-4)
    st = engine.stats
    assert (st.lens_steps, st.lens_layers, st.exit_layers_saved) == (1, LAYERS, 0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize(("patience", "min_layer"), [(1, 0), (2, 0), (1, 2)])
def test_decisive_margins_skip_the_later_layers(family, patience, min_layer):
    model = tiny_model(family, layers=LAYERS)
    engine = engine_for(model)
    prefix = engine.add(Sequence(rand(30, 4), hold=True))
    drain(engine)
    asks = [engine.add(Sequence(prefix.ids + rand(6 + i, 5 + i), parent=prefix, keep_logits=True,
                                layer_exit=LayerExit(0.0, patience, min_layer))) for i in range(3)]
    ran = max(patience, min_layer + 1)
    with layer_calls(model) as calls:
        engine.step()
    assert calls == [1] * ran + [0] * (LAYERS - ran)  # one step for all three questions
    assert not any(layer._forward_hooks for layer in model.get_decoder().layers)
    engine.check()
    for seq in asks:
        assert seq.finished and seq.stop_reason == "prefilled" and seq.out.logits is None
        assert seq.out.lens.exit_layer == ran - 1 and len(seq.out.lens.margins) == ran
        assert seq.out.lens.score == pytest.approx(1 / (1 + math.exp(-seq.out.lens.margins[-1])))
    st = engine.stats
    assert (st.lens_steps, st.lens_layers, st.exit_layers_saved) == (1, ran, LAYERS - ran)


def test_a_step_runs_every_layer_until_all_its_rows_exit():
    model = tiny_model("llama", layers=LAYERS)
    engine = engine_for(model)
    prefix = engine.add(Sequence(rand(30, 6), hold=True))
    drain(engine)
    eager, patient = [engine.add(Sequence(prefix.ids + rand(7, 7), parent=prefix, keep_logits=True,
                                          layer_exit=LayerExit(t))) for t in (0.0, math.inf)]
    with layer_calls(model) as calls:
        engine.step()
    assert calls == [1] * LAYERS
    assert eager.out.lens.exit_layer == 0 and eager.out.lens.score is not None and eager.out.logits is not None
    assert patient.out.lens.exit_layer is None and len(patient.out.lens.margins) == LAYERS and patient.out.logits is not None
    assert engine.stats.exit_layers_saved == 0


def test_only_the_last_chunk_of_a_long_question_can_exit():
    model = tiny_model("llama", layers=LAYERS)
    engine = engine_for(model, prefill_chunk=8)
    prefix_ids = rand(12, 8)
    prefix, seq = ask(engine, prefix_ids, rand(19, 9), LayerExit(0.0))
    engine.release(prefix)
    with layer_calls(model) as calls:
        drain(engine)
    assert calls == [3] + [2] * (LAYERS - 1)  # chunks of 8, 8 and 3 tokens: the third stops after layer 0
    assert seq.out.lens.exit_layer == 0 and engine.stats.lens_steps == 1


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_blocks_of_an_exited_step_are_not_reused(family):
    model = tiny_model(family, layers=LAYERS)
    prefix_ids, question = rand(30, 10), rand(14, 11)  # blocks of 4: the question fills blocks of its own
    cached = {}
    for threshold in (math.inf, 0.0):
        engine = engine_for(model)
        prefix, seq = ask(engine, prefix_ids, question, LayerExit(threshold))
        drain(engine)
        again = engine.add(Sequence(prefix_ids + question, keep_logits=True))
        drain(engine)
        cached[threshold] = again.out.cached_tokens
        engine.release(prefix)
        engine.check()
        assert torch.allclose(again.out.logits, model_logits(model, prefix_ids + question), atol=1e-5)
    assert cached[math.inf] == 40  # every full block reused after a step that ran every layer
    assert cached[0.0] == 28  # only the prefix's full blocks after a step that stopped early


def test_the_lens_hooks_go_when_the_forward_raises(monkeypatch):
    model = tiny_model("llama", layers=LAYERS)
    engine = engine_for(model)
    prefix, seq = ask(engine, rand(20, 12), rand(9, 13), LayerExit(math.inf))
    layers = model.get_decoder().layers

    def boom(*args, **kwargs):
        raise RuntimeError("layer 2 failed")

    monkeypatch.setattr(layers[2], "forward", boom)
    with pytest.raises(RuntimeError, match="layer 2 failed"):
        engine.step()
    assert all(not layer._forward_hooks for layer in layers)
    assert seq.stop_reason == "error" and "layer 2 failed" in seq.out.error
    engine.check()
    monkeypatch.undo()
    again = engine.add(Sequence(seq.prompt_ids, keep_logits=True))
    drain(engine)
    assert again.out.cached_tokens == 20  # the prefix's full blocks; nothing the failed step wrote
    assert torch.allclose(again.out.logits, model_logits(model, again.prompt_ids), atol=1e-5)


def test_other_problems_decode_as_without_the_questions():
    model = tiny_model("qwen2", layers=LAYERS)
    tokens = {}
    for with_asks in (False, True):
        engine = engine_for(model)
        prefix = engine.add(Sequence(rand(25, 14), hold=True))
        drain(engine)
        other = engine.add(Sequence(rand(21, 15), max_tokens=12))
        if with_asks:  # questions arrive with another problem's prompt: they must not share its step
            for i in range(3):
                engine.add(Sequence(prefix.ids + rand(5, 16 + i), parent=prefix, layer_exit=LayerExit(0.0)))
        drain(engine)
        tokens[with_asks] = other.token_ids
        assert engine.stats.exit_layers_saved == (LAYERS - 1 if with_asks else 0)  # the questions share a step
    assert tokens[True] == tokens[False]


def test_a_layer_exit_needs_a_lens_and_a_prompt_only_sequence():
    with pytest.raises(ValueError, match="LogitLens"):
        Engine(tiny_model("llama"), kv_budget=1 << 20).add(Sequence([1, 2], layer_exit=LayerExit(1.0)))
    with pytest.raises(ValueError, match="prompt-only"):
        Sequence([1, 2], max_tokens=3, layer_exit=LayerExit(1.0))
    with pytest.raises(ValueError, match="prompt-only"):
        Sequence([1, 2], hold=True, layer_exit=LayerExit(1.0))
    with pytest.raises(ValueError, match="threshold"):
        LayerExit(-1.0)
    with pytest.raises(ValueError, match="patience"):
        LayerExit(1.0, 0)
    with pytest.raises(ValueError, match="min_layer"):
        LayerExit(1.0, 1, -1)
