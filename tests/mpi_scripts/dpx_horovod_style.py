"""Run under mpirun/horovodrun -np 2: a script written for horovod.torch, import swapped.

Everything below the import is plain Horovod usage, then hvdllm's extra
compressions through the same DistributedOptimizer.  Each check compares
with values computed from rank and size.
"""
import torch
import torch.nn.functional as F

import hvdllm.torch as hvd

hvd.init()
rank, size = hvd.rank(), hvd.size()
assert 0 <= hvd.local_rank() < hvd.local_size() <= size and hvd.is_initialized()
ranks_sum = size * (size - 1) / 2

# Collectives.
t = torch.full((3,), float(rank))
assert torch.allclose(hvd.allreduce(t, name="avg"), torch.full((3,), ranks_sum / size))
assert torch.allclose(hvd.allreduce(t, op=hvd.Sum, name="sum"), torch.full((3,), ranks_sum))
hvd.allreduce_(t, op=hvd.Sum, name="sum_")
assert torch.allclose(t, torch.full((3,), ranks_sum))
handle = hvd.allreduce_async_(torch.ones(2) * rank, op=hvd.Average, name="async")
assert torch.allclose(hvd.synchronize(handle), torch.full((2,), ranks_sum / size))
gathered = hvd.allgather(torch.tensor([[float(rank)] * 2]), name="gather")
assert gathered[:, 0].tolist() == [float(r) for r in range(size)]
assert hvd.broadcast(torch.tensor([float(rank)]), root_rank=size - 1, name="b").item() == size - 1
b = torch.tensor([float(rank)])
hvd.broadcast_(b, root_rank=0, name="b_")
assert b.item() == 0.0
assert hvd.broadcast_object({"from": rank}, root_rank=0) == {"from": 0}
half = hvd.allreduce(torch.full((4,), 1.5), compression=hvd.Compression.fp16, name="fp16")
assert half.dtype == torch.float32 and torch.allclose(half, torch.full((4,), 1.5))


def train(compression, steps=4, passes=2):
    """Horovod's training recipe; returns the parameters after ``steps`` steps."""
    torch.manual_seed(1 + rank)  # different initial weights: broadcast must fix them
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression,
                                         backward_passes_per_step=passes, op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(passes):
            x, y = torch.randn(8, 10, generator=gen), torch.randint(0, 4, (8,), generator=gen)
            F.cross_entropy(model(x), y).backward()
        optimizer.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with optimizer.skip_synchronize():
            optimizer.step()
    assert isinstance(optimizer, torch.optim.AdamW)
    if hasattr(compression, "mode"):  # an hvdllm compression: its compressor did the work
        assert optimizer.compressor.bytes_sent > 0
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = hvd.allgather(flat[None], name=f"check.{getattr(compression, 'mode', 'hvd')}")
    assert all(torch.equal(copies[0], c) for c in copies), "parameters differ across ranks"
    return flat


exact = train(hvd.Compression.none)
assert torch.allclose(train(hvd.Compression.fp16), exact, rtol=1e-2, atol=1e-3)
# hvdllm's extras: top-k with ratio 1 is the exact average; the others stay in sync.
assert torch.allclose(train(hvd.Compression.topk(ratio=1.0)), exact, rtol=1e-5, atol=1e-6)
assert torch.allclose(train(hvd.Compression.bf16), exact, rtol=5e-2, atol=5e-3)
for lossy in (hvd.Compression.topk(ratio=0.1), hvd.Compression.powersgd(rank=2)):
    assert not torch.allclose(train(lossy), exact, rtol=1e-5, atol=1e-6)
for misuse in (lambda: hvd.allreduce(torch.ones(2), compression=hvd.Compression.topk()),
               lambda: hvd.DistributedOptimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(),
                                                                lr=0.1),
                                                compression=hvd.Compression.bf16, op=hvd.Sum)):
    try:
        misuse()
        raise AssertionError("misuse was accepted")
    except (TypeError, ValueError) as exc:
        assert "Compression." in str(exc), exc
print(f"rank {rank}: horovod-style script passed", flush=True)
