"""The family contract (hvdllm.common.family) against the PyTorch models and TP layers.

Single process: tensor-parallel ranks are faked by building one sharded
model per rank with a TP group that only knows its rank and size (slicing
a full weight needs no communication), and :func:`full_tensor`'s allgather
by concatenating those ranks' shards.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from hvdllm.common.config import Config, ModelConfig, ParallelConfig, default_d_ff
from hvdllm.common.family import (FAMILIES, Split, family_spec, get_family, padded_rows, shard,
                                  unshard)
from hvdllm.common.hf import hf_names, hf_shapes, hf_to_hvdllm, hvdllm_to_hf
from hvdllm.torch.engine import build_model
from hvdllm.torch.models import GPTConfig, LlamaConfig, model_from_config
from hvdllm.torch.pipeline.stage import embedding_modules, head_modules, tied_embedding
from hvdllm.torch.tensor_parallel import (GPT_PLAN, LLAMA_PLAN, ColumnParallelLinear,
                                          RowParallelLinear, TensorParallelGroup,
                                          VocabParallelEmbedding, VocabParallelLMHead,
                                          full_tensor, padded_vocab_size, parallelize,
                                          parameter_split)

SMALL = dict(n_layer=2, n_head=4, d_model=32, seq_len=8, vocab_size=259)
SHAPES = [  # (family, n_head, n_kv_head)
    ("gpt", 4, 0), ("llama", 4, 0), ("llama", 4, 2), ("llama", 4, 1), ("llama", 8, 2),
]


def model_cfg(family: str, n_head: int = 4, n_kv_head: int = 0, **kw) -> ModelConfig:
    fields = dict(SMALL, family=family, n_head=n_head, n_kv_head=n_kv_head)
    fields.update(kw)
    return ModelConfig(**fields)


def fake_tp(rank: int, size: int) -> TensorParallelGroup:
    """A TP group handle that can slice (``local_part``) but never communicates."""
    return TensorParallelGroup(SimpleNamespace(size=size, rank=rank, kind="tp",
                                               ranks=list(range(size))))


class GatherFrom:
    """Stands in for a TP group in :func:`full_tensor`: its allgather joins given shards."""

    def __init__(self, shards: list[torch.Tensor]):
        self.shards = shards
        self.size = len(shards)

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([s.detach() for s in self.shards], dim=dim)


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: p.detach().numpy().copy()
            for name, p in model.named_parameters(remove_duplicate=False)}


# -- the spec against the reference models --------------------------------

@pytest.mark.parametrize("family,n_head,n_kv_head", SHAPES)
def test_spec_names_and_shapes_match_the_torch_models(family, n_head, n_kv_head):
    cfg = model_cfg(family, n_head, n_kv_head)
    spec = family_spec(cfg)
    model = model_from_config(cfg)
    every = [(n, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)]
    assert list(spec.shapes(tied=True).items()) == every  # tied head included, model order
    stored = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert list(spec.shapes().items()) == stored  # tied head left out
    assert model.spec.shapes() == spec.shapes()
    for t in spec:
        if t.block is None:
            assert t.section in ("embedding", "head") and not t.name.startswith("blocks.")
        else:
            assert t.section == "block" and t.name.startswith(f"blocks.{t.block}.")


def test_ties_and_pipeline_pieces():
    gpt, llama = model_from_config(model_cfg("gpt")), model_from_config(model_cfg("llama"))
    assert family_spec(model_cfg("gpt")).ties == {"lm_head.weight": "wte.weight"}
    assert family_spec(model_cfg("llama")).ties == {}
    assert gpt.lm_head.weight is gpt.wte.weight
    assert (embedding_modules(gpt), head_modules(gpt)) == (("wte", "wpe"), ("ln_f", "lm_head"))
    assert (embedding_modules(llama), head_modules(llama)) == (("tok_emb",), ("norm", "lm_head"))
    assert tied_embedding(gpt) and not tied_embedding(llama)


def test_plans_come_from_the_spec():
    assert list(GPT_PLAN) == ["wte", "wpe", "blocks.*.attn.qkv", "blocks.*.attn.proj",
                              "blocks.*.mlp.fc", "blocks.*.mlp.proj", "lm_head"]
    assert list(LLAMA_PLAN) == ["tok_emb", "blocks.*.attn.wq", "blocks.*.attn.wk",
                                "blocks.*.attn.wv", "blocks.*.attn.wo", "blocks.*.mlp.w_gate",
                                "blocks.*.mlp.w_up", "blocks.*.mlp.w_down", "lm_head"]


# -- shard / unshard -------------------------------------------------------

SPLITS = [Split.replicated(), Split.column(), Split.column(3), Split.row(), Split.vocab(10),
          Split.vocab(12)]


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s.kind}{s.parts}-{s.full_rows}")
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shard_unshard_round_trip(split, size):
    rng = np.random.default_rng(size)
    rows = split.full_rows or 12 * split.parts
    full = rng.standard_normal((rows, 12)).astype(np.float32)
    pieces = [shard(full, split, r, size) for r in range(size)]
    for piece in pieces:
        assert piece.shape == split.shard_shape(full.shape, size)
    back = unshard(pieces, split.to_dict())  # the dict form works as well
    assert back.dtype == full.dtype and np.array_equal(back, full)
    if split.kind == "vocab":
        padded = np.concatenate(pieces)
        assert padded.shape[0] == padded_rows(rows, size) == padded_vocab_size(rows, size)
        assert not padded[rows:].any()
    if split.kind == "column" and split.parts == 3:  # shard r = [q_r k_r v_r]
        h = 12 // size
        q, k, v = np.split(full, 3)
        assert np.array_equal(pieces[-1], np.concatenate([q[-h:], k[-h:], v[-h:]]))


def test_split_dicts():
    for split in SPLITS:
        d = split.to_dict()
        assert set(d) == {"kind", "dim", "parts", "full_rows"}
        assert Split.from_dict(json.loads(json.dumps(d))) == split
    assert Split.column(3).to_dict() == {"kind": "column", "dim": 0, "parts": 3,
                                         "full_rows": None}
    assert Split.from_dict({"kind": "replicated"}) == Split()
    assert Split.from_dict({"kind": "row"}) == Split.row()
    for bad in ({"kind": "diagonal"}, {"kind": "row", "parts": 2}, {"kind": "vocab"},
                {"kind": "column", "full_rows": 3}, {"kind": "column", "axis": 0}):
        with pytest.raises(ValueError):
            Split.from_dict(bad)


def test_unshard_refuses_pieces_that_do_not_fit():
    with pytest.raises(ValueError, match="equal shapes"):
        Split.row().unshard([np.zeros((2, 2)), np.zeros((2, 3))])
    with pytest.raises(ValueError, match="padded vocabulary"):
        Split.vocab(10).unshard([np.zeros((2, 2))] * 2)
    with pytest.raises(ValueError, match="rows but the vocab split"):
        Split.vocab(10).shard(np.zeros((11, 2)), 0, 2)
    with pytest.raises(ValueError, match="in 3 fused parts does not split evenly over 4"):
        Split.column(3).shard(np.zeros((18, 2)), 0, 4)
    with pytest.raises(ValueError, match="outside"):
        Split.row().shard(np.zeros((2, 4)), 2, 2)


# -- agreement with the torch TP layers ------------------------------------

@pytest.mark.parametrize("size", [2, 4])
def test_numpy_shards_are_what_the_torch_layers_hold(size):
    torch.manual_seed(0)
    d_in, d_out, vocab = 6, 12 * size, 4 * size + 1
    dense = {"col": nn.Linear(d_in, d_out), "qkv": nn.Linear(d_in, d_out),
             "row": nn.Linear(d_out, d_in), "emb": nn.Embedding(vocab, d_in),
             "head": nn.Linear(d_in, vocab, bias=False)}
    splits = {"col": Split.column(), "qkv": Split.column(3), "row": Split.row(),
              "emb": Split.vocab(vocab), "head": Split.vocab(vocab)}
    build = {"col": lambda m, tp: ColumnParallelLinear.from_dense(m, tp),
             "qkv": lambda m, tp: ColumnParallelLinear.from_dense(m, tp, parts=3),
             "row": RowParallelLinear.from_dense, "emb": VocabParallelEmbedding.from_dense,
             "head": VocabParallelLMHead.from_dense}
    for key, layer in dense.items():
        shards = [build[key](layer, fake_tp(r, size)) for r in range(size)]
        for pname, full in layer.named_parameters():
            split = splits[key] if pname == "weight" or key != "row" else Split()
            pieces = [getattr(s, pname) for s in shards]
            assert parameter_split(pieces[0]) == split, (key, pname)
            want = full.detach().numpy()
            for r, piece in enumerate(pieces):
                assert np.array_equal(piece.detach().numpy(), split.shard(want, r, size))
            assert np.array_equal(split.unshard([p.detach().numpy() for p in pieces]), want)
            gathered = full_tensor(pieces[0], GatherFrom(pieces))
            assert torch.equal(gathered, full.detach()), (key, pname)


TP_CASES = [("gpt", 4, 0, 2), ("gpt", 4, 0, 4), ("llama", 4, 0, 2), ("llama", 4, 2, 2),
            ("llama", 8, 2, 2), ("llama", 8, 4, 4)]


@pytest.mark.parametrize("family,n_head,n_kv_head,size", TP_CASES)
def test_parallelized_models_hold_the_spec_shards(family, n_head, n_kv_head, size):
    cfg = model_cfg(family, n_head, n_kv_head, d_ff=16 * size)
    spec = family_spec(cfg)
    torch.manual_seed(3)
    full = numpy_state(model_from_config(cfg))
    ranks = []
    for r in range(size):
        torch.manual_seed(3)
        ranks.append(parallelize(model_from_config(cfg), fake_tp(r, size)))
    params = [dict(m.named_parameters(remove_duplicate=False)) for m in ranks]
    assert list(params[0]) == list(spec.names)
    if spec.ties:
        assert ranks[0].lm_head.weight is ranks[0].wte.weight  # still one parameter
    for t in spec:
        pieces = [p[t.name] for p in params]
        assert parameter_split(pieces[0]) == t.split, t.name
        assert tuple(pieces[0].shape) == t.split.shard_shape(t.shape, size), t.name
        for r, piece in enumerate(pieces):
            assert np.array_equal(piece.detach().numpy(), t.split.shard(full[t.name], r, size)), \
                (t.name, r)
        back = unshard([p.detach().numpy() for p in pieces], t.split)
        assert np.array_equal(back, full[t.name]), t.name
        assert np.array_equal(full_tensor(pieces[0], GatherFrom(pieces)).numpy(), back), t.name
    assert spec["wpe.weight" if family == "gpt" else "norm.weight"].split == Split()


def test_tp_that_splits_a_head_is_refused():
    cfg = model_cfg("llama", n_head=8, n_kv_head=2, d_ff=64)
    problems = family_spec(cfg).tp_problems(4)
    assert len(problems) == 1 and "model.n_kv_head=2 is not divisible by tp=4" in problems[0]
    assert family_spec(cfg).tp_problems(2) == []
    with pytest.raises(ValueError, match="n_kv_head=2 is not divisible by tp=4"):
        parallelize(model_from_config(cfg), fake_tp(0, 4))


# -- Hugging Face names and the d_ff default -------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_names_round_trip(family):
    cfg = model_cfg(family, 4, 2 if family == "llama" else 0)
    names = hf_names(cfg)
    assert len(set(theirs for theirs, _ in names.values())) == len(names)
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32)
               for n, s in family_spec(cfg).shapes().items()}
    exported = hvdllm_to_hf(cfg, tensors)
    assert {k: v.shape for k, v in exported.items()} == hf_shapes(cfg)
    back = hf_to_hvdllm(cfg, exported)
    assert list(back) == list(names)
    assert all(np.array_equal(back[n], tensors[n]) for n in tensors)


def test_hf_names_match_transformers():
    transformers = pytest.importorskip("transformers")
    hf_cfgs = {
        "gpt": transformers.GPT2Config(n_positions=8, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                       vocab_size=259),
        "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=8,
                                          vocab_size=259),
    }
    for family, hf_cfg in hf_cfgs.items():
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        theirs = {n: tuple(p.shape) for n, p in hf_model.state_dict().items()}
        if family == "gpt":
            assert theirs.pop("lm_head.weight") == theirs["transformer.wte.weight"]  # tied
        cfg = model_cfg(family, 4, 2 if family == "llama" else 0, d_ff=64)
        assert hf_shapes(cfg) == theirs


def test_d_ff_default_has_one_source():
    assert (default_d_ff("gpt", 96), default_d_ff("llama", 96), default_d_ff("llama", 104)) \
        == (384, 256, 320)
    for d in (8, 32, 64, 96, 100, 104, 4096):
        assert ModelConfig(family="gpt", d_model=d).ff_width == GPTConfig(d_model=d).ff_width \
            == 4 * d
        assert ModelConfig(family="llama", d_model=d).ff_width \
            == LlamaConfig(d_model=d).ff_width == get_family("llama").default_d_ff(d) \
            == 64 * -(-8 * d // (3 * 64))
    assert ModelConfig(family="llama", d_model=96, d_ff=100).ff_width == 100
    with pytest.raises(ValueError, match="unknown model family"):
        default_d_ff("bert", 64)


# -- recompute at pp = 1 ----------------------------------------------------

def _step(model, idx):
    torch.manual_seed(11)  # the same dropout masks in both runs
    model.zero_grad(set_to_none=True)
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,dropout", [("gpt", 0.0), ("gpt", 0.1), ("llama", 0.0)])
def test_recompute_at_pp1_matches_and_recomputes(family, dropout):
    idx = torch.randint(0, SMALL["vocab_size"], (2, SMALL["seq_len"] + 1),
                        generator=torch.Generator().manual_seed(5))
    results = {}
    for recompute in ("none", "full"):
        cfg = Config(model=model_cfg(family, 4, 2 if family == "llama" else 0, dropout=dropout),
                     parallel=ParallelConfig(recompute=recompute))
        model = build_model(cfg)
        assert model.recompute == (recompute == "full")
        calls = []  # pre-hooks: a recompute stops once it has what backward needs
        for key, block in model.blocks.items():
            block.register_forward_pre_hook(lambda *_, key=key: calls.append(key))
        loss, grads = _step(model, idx)
        results[recompute] = loss, grads
        per_block = 2 if recompute == "full" else 1
        assert sorted(calls) == sorted(list(model.blocks) * per_block), calls
        calls.clear()
        with torch.no_grad():
            model(idx[:, :-1])
        assert len(calls) == len(model.blocks)  # nothing to recompute without a backward
    (loss_a, grads_a), (loss_b, grads_b) = results["none"], results["full"]
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert list(grads_a) == list(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-6)


def test_recompute_flag_is_left_to_the_pipeline_when_pp_is_above_one():
    cfg = Config(model=model_cfg("gpt"), parallel=ParallelConfig(pp=2, recompute="full"))
    assert build_model(cfg).recompute is False
