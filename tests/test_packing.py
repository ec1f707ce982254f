"""Real sequences in the model: packed documents attend only within themselves, padding never
reaches a real token, in forward, generate(), lm-eval and training (data.document_masking)."""

import pytest
import torch

from flash_depth.data.pipeline import document_positions
from flash_depth.models import DEPTH_MECHANISMS, FlashDepthConfig, FlashDepthForCausalLM
from oracle import rel_err


def _model(mech, backend="reference", **kw):
    torch.manual_seed(0)
    cfg = FlashDepthConfig.from_preset("tiny", depth_mechanism=mech, attnres_blocks=4, attention_backend=backend, **kw)
    model = FlashDepthForCausalLM(cfg).eval()
    if model.model.attnres is not None:  # zero queries read uniformly: move off init so positions matter
        with torch.no_grad():
            model.model.attnres.queries.normal_(0, 0.5)
    return model


def _docs(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (1, n), generator=g) for n in lengths]


@pytest.mark.parametrize("mech", DEPTH_MECHANISMS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_documents_give_each_documents_logits(mech, backend):
    """Two rows of two documents each (found where position_ids restart at 0), and one row of
    two documents given as cu_seqlens, against every document run alone."""
    model = _model(mech, backend)
    a, b, c, d = _docs(7, 5, 4, 8)
    with torch.no_grad():
        alone = [model(x).logits for x in (a, b, c, d)]
        rows = torch.cat([torch.cat([a, b], 1), torch.cat([c, d], 1)])
        positions = torch.stack([torch.cat([torch.arange(7), torch.arange(5)]),
                                 torch.cat([torch.arange(4), torch.arange(8)])])
        packed = model(rows, position_ids=positions).logits
        flat = model(rows[:1], cu_seqlens=torch.tensor([0, 7, 12], dtype=torch.int32), max_seqlen=7).logits
    assert rel_err(packed[0], torch.cat(alone[:2], 1)[0]) < 1e-5
    assert rel_err(packed[1], torch.cat(alone[2:], 1)[0]) < 1e-5
    assert rel_err(flat, torch.cat(alone[:2], 1)) < 1e-5


@pytest.mark.parametrize("mech,backend", [("moda", "triton"), ("attnres_block", "reference"),
                                          ("residual", "reference")])
def test_packed_training_gradients_are_the_documents_own(mech, backend):
    """The packed loss (each document's next-token terms) has the gradients of the documents'
    losses computed apart: nothing flows across a boundary, through the depth stream included."""
    model = _model(mech, backend).train()
    a, b = _docs(6, 9, seed=1)

    def nll(logits, ids):
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")

    apart = nll(model(a).logits, a) + nll(model(b).logits, b)
    want = torch.autograd.grad(apart, list(model.parameters()), allow_unused=True)
    ids = torch.cat([a, b], 1)
    logits = model(ids, position_ids=torch.cat([torch.arange(6), torch.arange(9)])).logits
    packed = nll(logits[:, :6], a) + nll(logits[:, 6:], b)
    got = torch.autograd.grad(packed, list(model.parameters()), allow_unused=True)
    assert rel_err(packed, apart) < 1e-5
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        assert (g is None) == (w is None), name
        assert g is None or rel_err(g, w) < 1e-4, (name, rel_err(g, w))


def _left_padded(prompts, pad_id=0):
    width = max(p.shape[1] for p in prompts)
    ids = torch.cat([torch.cat([torch.full((1, width - p.shape[1]), pad_id), p], 1) for p in prompts])
    mask = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1]), torch.ones(1, p.shape[1])], 1)
                      for p in prompts]).long()
    return ids, mask


@pytest.mark.parametrize("mech,backend", [(m, "reference") for m in DEPTH_MECHANISMS] + [("moda", "triton")])
def test_left_padded_batch_gives_each_prompts_logits_and_tokens(mech, backend):
    """Logits at real positions and greedy generate() (cached decoding with the growing mask)
    equal each prompt's alone; padded positions stay finite. (Triton: two prompts, the
    interpreter is slow; its first layer has no depth slots, so padded queries see no key.)"""
    model = _model(mech, backend)
    prompts = _docs(7, 3, 5, seed=2)[: 2 if backend == "triton" else 3]
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        alone = [model(p).logits for p in prompts]
    assert torch.isfinite(logits).all()
    for row, (p, want) in enumerate(zip(prompts, alone)):
        assert rel_err(logits[row, ids.shape[1] - p.shape[1]:], want[0]) < 1e-5, row
    new = 4
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    for row, p in enumerate(prompts):
        single = model.generate(p, max_new_tokens=new, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[row, -new:], single[0, -new:]), row


def test_right_padding_and_bad_combinations():
    model = _model("moda")
    a, b = _docs(6, 4, seed=3)
    ids = torch.cat([a, torch.cat([b, torch.zeros(1, 2, dtype=torch.long)], 1)])
    mask = (ids != -1).long()
    mask[1, 4:] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        assert rel_err(logits[1, :4], model(b).logits[0]) < 1e-5  # right padding changes nothing before it
        positions = torch.cat([torch.arange(3), torch.arange(3)])[None]
        with pytest.raises(ValueError, match="packed documents .* take no KV cache"):
            model(a, position_ids=positions, use_cache=True)
        with pytest.raises(ValueError, match=r"needs input_ids of shape \[1, total tokens\]"):
            model(ids, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), max_seqlen=6)
        with pytest.raises(ValueError, match="max_seqlen must be at least the longest document"):
            model(a, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), max_seqlen=5)
        with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
            model(a, position_ids=torch.zeros(1, 6))


def test_lm_eval_batched_requests_score_as_single_ones():
    """lm-eval pads batched loglikelihood requests on the right and generate_until prompts on the
    left (with an attention_mask): batch_size must not change a score or a generated text."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from flash_depth.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    model = _model("moda", vocab_size=tok.vocab_size, **tok.special_ids())
    pairs = [("To be", " or not"), ("A much longer context", " x"), ("Hi", " there, friend")]
    results = []
    for batch_size in (1, 3):
        lm = HFLM(pretrained=model, tokenizer=tok.to_hf(), batch_size=batch_size, device="cpu", max_length=512)
        scores = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                                  disable_tqdm=True)
        gen = {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}
        texts = lm.generate_until([Instance("generate_until", {}, (ctx, gen), i) for i, (ctx, _) in enumerate(pairs)],
                                  disable_tqdm=True)
        results.append(([s for s, _ in scores], texts))
    (one, one_text), (three, three_text) = results
    assert max(abs(x - y) for x, y in zip(one, three)) < 1e-4, (one, three)
    assert one_text == three_text


def test_document_positions_restart_at_each_eos():
    windows = torch.tensor([[5, 6, 0, 7, 8, 0, 0, 3], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert document_positions(windows, 0).tolist() == [[0, 1, 0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
    with pytest.raises(TypeError, match="windows must be an integer tensor"):
        document_positions(windows.float(), 0)


def test_training_with_document_masking(tmp_path, monkeypatch):
    """data.document_masking=true hands the model per-document positions in training and
    validation batches; it is refused under a CUDA graph."""
    from flash_depth.cli import main as cli
    from flash_depth.train import loop
    from flash_depth.train.config import ConfigError, load_config

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"d{i}.txt").write_text(f"document {i} " + "depth attention layer " * (i % 4 + 1))
    seen = []

    def spy(windows, eos_id):
        positions = document_positions(windows, eos_id)
        seen.append(bool((positions[..., 1:] == 0).any()))
        return positions

    monkeypatch.setattr(loop, "document_positions", spy)
    args = ["train", "--out", str(tmp_path / "run"), "--max-steps", "2", "--device", "cpu", f"data.source={docs}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.tokenizer=bytes", "data.document_masking=true",
            "model.num_hidden_layers=2", "model.hidden_size=32", "model.intermediate_size=64", "train.seq_len=48",
            "train.batch_size=2", "train.eval_every=2", "train.eval_batches=1"]
    assert cli(args) == 0
    assert len(seen) == 3 and any(seen)  # two steps and one validation batch, windows holding several documents
    with pytest.raises(ConfigError, match="document_masking=true cannot run under train.cuda_graph"):
        load_config(None, ["data.document_masking=true", "train.cuda_graph=true"])
