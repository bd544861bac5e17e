"""Run under mpirun -np 2 or 4: every TP layer and mapping against its dense twin.

All ranks form one TP group (tp = world size).  Dense layers are built on
every rank from the same seed; the TP versions are sliced from them.
Forward outputs and the gradients of input, weight and bias must agree
within 1e-5, for both transports (mpi4py and Horovod), with and without
sequence parallelism, and for whole GPT and LLaMA models.
Argument: "mpi" or "horovod" (the transport).
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI

from hvdllm.common.comm import Group
from hvdllm.torch.distributed import import_horovod
from hvdllm.torch.models import GPT, GPTConfig, Llama, LlamaConfig
from hvdllm.torch.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, TensorParallelGroup, VocabParallelCrossEntropy,
    VocabParallelEmbedding, VocabParallelLMHead, copy_to_region, full_state_dict,
    gather_from_region,
    gather_from_sequence, padded_vocab_size, parallelize, reduce_from_region,
    reduce_scatter_to_sequence, replicated_parameters, scatter_to_region, scatter_to_sequence)

TOL = 1e-5
backend = sys.argv[1]
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
hvd = import_horovod()
hvd.init(comm=comm)
group = Group("tp", comm, range(size), timeout_sec=60, process_set=hvd.global_process_set)
tp = TensorParallelGroup(group, backend=backend, hvd=hvd)
torch.set_num_threads(1)
checks = 0


def close(name, got, want, tol=TOL):
    global checks
    err = (got.detach() - want.detach()).abs().max().item()
    scale = max(1.0, want.detach().abs().max().item())
    if not err <= tol * scale:
        raise AssertionError(f"rank {rank} tp={size} {backend}: {name} differs by {err:.3e}")
    checks += 1


def part(t, dim):
    return t.chunk(size, dim=dim)[rank]


# -- the mappings, with expectations computed from rank and size ------------
x = torch.full((2, 4 * size, 3), float(rank + 1), requires_grad=True)
out = copy_to_region(x, tp)
(out * (rank + 1)).sum().backward()
close("copy_to_region forward", out, x)
close("copy_to_region backward", x.grad, torch.full_like(x, size * (size + 1) / 2))

x.grad = None
out = reduce_from_region(x, tp)
(out * (rank + 1)).sum().backward()
close("reduce_from_region forward", out, torch.full_like(x, size * (size + 1) / 2))
close("reduce_from_region backward", x.grad, torch.full_like(x, rank + 1))

full = torch.arange(2 * 3 * 4 * size, dtype=torch.float32).view(2, 3, 4 * size)
xs = full.clone().requires_grad_(True)
out = scatter_to_region(xs, tp)
close("scatter_to_region forward", out, part(full, -1))
out.sum().backward()
close("scatter_to_region backward", xs.grad, torch.ones_like(full))  # gathered ones

local = part(full, -1).clone().requires_grad_(True)
out = gather_from_region(local, tp)
close("gather_from_region forward", out, full)
(out * full).sum().backward()
close("gather_from_region backward", local.grad, part(full, -1))

seq_full = torch.randn(2, 4 * size, 5, generator=torch.Generator().manual_seed(7))
xs = seq_full.clone().requires_grad_(True)
out = scatter_to_sequence(xs, tp)
close("scatter_to_sequence forward", out, part(seq_full, 1))
out.sum().backward()
close("scatter_to_sequence backward", xs.grad, torch.ones_like(seq_full))

local = part(seq_full, 1).clone().requires_grad_(True)
out = gather_from_sequence(local, tp)
close("gather_from_sequence forward", out, seq_full)
(out * (rank + 1)).sum().backward()  # reduce-scatter of the per-rank gradients
close("gather_from_sequence backward", local.grad,
      torch.full_like(local, size * (size + 1) / 2))

xs = (seq_full * (rank + 1)).requires_grad_(True)
out = reduce_scatter_to_sequence(xs, tp)
close("reduce_scatter_to_sequence forward", out, part(seq_full, 1) * size * (size + 1) / 2)
out.sum().backward()
close("reduce_scatter_to_sequence backward", xs.grad, torch.ones_like(seq_full))

# -- layers against their dense twins -------------------------------------
gen = torch.Generator().manual_seed(1234)
torch.manual_seed(99)  # dense layers' default init: identical on every rank
d_in, d_out, b, t = 8, 4 * size * 3, 2, 4 * size


def rand(*shape):
    return torch.randn(*shape, generator=gen)


for sequence_parallel in (False, True):
    tp.sequence_parallel = sequence_parallel
    tag = "sp" if sequence_parallel else "tp"

    # Column-parallel (plain and fused q,k,v) feeding a row-parallel layer.
    for parts in (1, 3):
        col_dense, row_dense = nn.Linear(d_in, d_out), nn.Linear(d_out, d_in)
        with torch.no_grad():
            col_dense.bias.copy_(rand(d_out))
            row_dense.bias.copy_(rand(d_in))
        col = ColumnParallelLinear.from_dense(col_dense, tp, parts=parts)
        row = RowParallelLinear.from_dense(row_dense, tp)
        if parts == 3:  # the fused layout: reorder the dense twin's rows rank-wise
            perm = torch.cat([c.chunk(size)[r] for r in range(size)
                              for c in torch.arange(d_out).chunk(3)])
            row_perm = perm  # row layer's input columns follow the same order
            with torch.no_grad():
                col_dense.weight.copy_(col_dense.weight[perm])
                col_dense.bias.copy_(col_dense.bias[perm])
                row_dense.weight.copy_(row_dense.weight[:, row_perm])
            col = ColumnParallelLinear.from_dense(col_dense, tp, parts=1)
            row = RowParallelLinear.from_dense(row_dense, tp)
        x_full = rand(b, t, d_in)
        x_dense = x_full.clone().requires_grad_(True)
        y_dense = row_dense(F.gelu(col_dense(x_dense)))
        (y_dense * y_dense).sum().backward()
        x_in = part(x_full, 1) if sequence_parallel else x_full
        x_tp = x_in.clone().requires_grad_(True)
        y_tp = row(F.gelu(col(x_tp)))
        (y_tp * y_tp).sum().backward()
        want_y = part(y_dense, 1) if sequence_parallel else y_dense
        want_xg = part(x_dense.grad, 1) if sequence_parallel else x_dense.grad
        close(f"{tag} column->row forward (parts={parts})", y_tp, want_y)
        close(f"{tag} column->row input grad", x_tp.grad, want_xg)
        close(f"{tag} column weight grad", col.weight.grad, part(col_dense.weight.grad, 0))
        close(f"{tag} column bias grad", col.bias.grad, part(col_dense.bias.grad, 0))
        close(f"{tag} row weight grad", row.weight.grad, part(row_dense.weight.grad, 1))
        row_bias_grad = row.bias.grad.clone()
        if sequence_parallel:  # replicated parameter seeing part of the sequence
            tp.all_reduce_grads([row.bias])
        close(f"{tag} row bias grad", row.bias.grad, row_dense.bias.grad)
        if sequence_parallel:
            assert not torch.allclose(row_bias_grad, row_dense.bias.grad), "partial expected"

    # gather_output and a row layer that splits its own input.
    if not sequence_parallel:
        col_dense = nn.Linear(d_in, d_out)
        col = ColumnParallelLinear.from_dense(col_dense, tp, gather_output=True)
        row_dense = nn.Linear(d_out, d_in)
        row = RowParallelLinear.from_dense(row_dense, tp)
        row.input_is_parallel = False
        x_dense = rand(b, t, d_in).requires_grad_(True)
        x_tp = x_dense.detach().clone().requires_grad_(True)
        (row_dense(col_dense(x_dense)) ** 2).sum().backward()
        y = col(x_tp)
        close("column gather_output forward", y, col_dense(x_tp))
        (row(y) ** 2).sum().backward()
        close("gather_output + split-input row: input grad", x_tp.grad, x_dense.grad)
        close("split-input row weight grad", row.weight.grad, part(row_dense.weight.grad, 1))

    # Vocabulary-parallel embedding, head and cross-entropy, padded vocabulary.
    vocab = 4 * size + 1  # never a multiple of size > 1: padding is exercised
    emb_dense = nn.Embedding(vocab, d_in)
    emb = VocabParallelEmbedding.from_dense(emb_dense, tp)
    head_dense = nn.Linear(d_in, vocab, bias=False)
    head = VocabParallelLMHead.from_dense(head_dense, tp)
    loss_fn = VocabParallelCrossEntropy(vocab, tp)
    assert emb.weight.size(0) * size == padded_vocab_size(vocab, size)
    idx = torch.randint(0, vocab, (b, t), generator=gen)
    idx[0, 0], idx[0, 1] = vocab - 1, 0  # the last real id and the first
    targets = torch.randint(0, vocab, (b, t), generator=gen)
    targets[1, :2] = vocab - 1
    h_dense = emb_dense(idx)
    logits_dense = head_dense(torch.tanh(h_dense))
    loss_dense = F.cross_entropy(logits_dense.view(-1, vocab), targets.view(-1))
    loss_dense.backward()
    h = emb(idx)
    close(f"{tag} vocab embedding forward", h, part(h_dense, 1) if sequence_parallel else h_dense)
    logits = head(torch.tanh(h))
    loss = loss_fn(logits, targets)
    close(f"{tag} vocab-parallel cross-entropy", loss, loss_dense)
    close(f"{tag} full logits", loss_fn.full_logits(logits), logits_dense)
    loss.backward()
    per = emb.weight.size(0)
    padded_emb = torch.cat([emb_dense.weight.grad, torch.zeros(emb.weight.size(0) * size - vocab,
                                                               d_in)])
    padded_head = torch.cat([head_dense.weight.grad,
                             torch.zeros(head.weight.size(0) * size - vocab, d_in)])
    close(f"{tag} embedding weight grad", emb.weight.grad, padded_emb[rank * per:(rank + 1) * per])
    close(f"{tag} head weight grad", head.weight.grad, padded_head[rank * per:(rank + 1) * per])
    if rank == size - 1:  # padded rows never get a gradient
        assert head.weight.grad[-1].abs().max() == 0 and emb.weight.grad[-1].abs().max() == 0

# -- whole models: loss and every gradient --------------------------------
tp.sequence_parallel = False
for family in ("gpt", "llama"):
    for sequence_parallel in (False, True):
        common = dict(vocab_size=4 * size + 3, seq_len=4 * size, n_layer=2, n_head=2 * size,
                      d_model=8 * size)
        torch.manual_seed(5)
        dense = (GPT(GPTConfig(**common)) if family == "gpt"
                 else Llama(LlamaConfig(n_kv_head=size, **common)))
        torch.manual_seed(5)
        sharded = (GPT(GPTConfig(**common)) if family == "gpt"
                   else Llama(LlamaConfig(n_kv_head=size, **common)))
        tp.sequence_parallel = sequence_parallel
        parallelize(sharded, tp)
        idx = torch.randint(0, common["vocab_size"], (2, common["seq_len"]), generator=gen)
        tgt = torch.roll(idx, -1, 1)
        loss_dense = dense.loss(idx, tgt)
        loss_dense.backward()
        loss_tp = sharded.loss(idx, tgt)
        loss_tp.backward()
        if sequence_parallel:
            tp.all_reduce_grads(replicated_parameters(sharded))
        tag = f"{family} {'sp' if sequence_parallel else 'tp'}"
        close(f"{tag} model loss", loss_tp, loss_dense)
        dense_params = dict(dense.named_parameters())
        for name, p in sharded.named_parameters():
            g = dense_params[name].grad
            if getattr(p, "hvdllm_tp_sharded", False) and p.shape != g.shape:
                if name.startswith(("wte", "tok_emb", "lm_head")):
                    g = torch.cat([g, g.new_zeros(p.size(0) * size - g.size(0), g.size(1))])
                    g = part(g, 0)
                elif name.endswith("qkv.weight") or name.endswith("qkv.bias"):
                    g = torch.cat([part(c, 0) for c in g.chunk(3)])
                elif p.shape[0] != g.shape[0]:
                    g = part(g, 0)
                else:
                    g = part(g, 1)
            close(f"{tag} grad {name}", p.grad, g)
        full = full_state_dict(sharded)
        for name, p in dense.named_parameters():
            close(f"{tag} full_state_dict {name}", full[name], p)
        assert set(full) == {n for n, _ in dense.named_parameters()}
        with tp.sequence_parallel_off():
            out = sharded.generate(idx[:1, :3], 4, generator=torch.Generator().manual_seed(1))
        ref = dense.generate(idx[:1, :3], 4, generator=torch.Generator().manual_seed(1))
        assert torch.equal(out, ref), (out, ref)
        tp.sequence_parallel = False

# -- collective count: LLaMA's q, k, v (and gate, up) share one input collective
torch.manual_seed(5)
n_layer = 3
model = parallelize(Llama(LlamaConfig(vocab_size=64, seq_len=8, n_layer=n_layer, n_head=2 * size,
                                      n_kv_head=size, d_model=8 * size)), tp)
calls = []
real_all_reduce = tp.all_reduce
tp.all_reduce = lambda t, op="sum": calls.append(op) or real_all_reduce(t, op)
idx = torch.randint(0, 64, (2, 8), generator=gen)
model.loss(idx, idx).backward()
tp.all_reduce = real_all_reduce
# forward: embedding, (wo, w_down) per layer, loss max and sums; backward:
# (q|k|v, gate|up) per layer, and the head's input.
expected = 1 + 2 * n_layer + 2 + 2 * n_layer + 1
assert len(calls) == expected, (len(calls), expected)
checks += 1

print(f"rank {rank}: tp layer checks passed ({checks} comparisons, {backend})", flush=True)
