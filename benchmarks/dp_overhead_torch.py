"""PyTorch sides of ``dp_overhead.py``: hvdllm's engine and its plain peers.

Every side trains the same model class (hvdllm's reference GPT) on the same
fixed token batches, with the same AdamW hyperparameters and the same number
of intra-op threads (``hvdllm.common.launch.threads_per_rank``).

* ``engine1``: hvdllm's engine at world size 1 (``build_engine`` over
  ``init_groups(Topology(1), ...)``), op ``step``.
* ``plain1``: a textbook loop, ``loss.backward(); opt.step(); opt.zero_grad()``,
  op ``step``.
* ``engine2``: hvdllm's engine at dp=2, ops ``step`` (a whole
  ``train_step``) and ``sync`` (the gradient sync alone, see
  :meth:`Engine2Side.sync`).
* ``ddp2``: ``DistributedDataParallel`` on gloo, ``no_sync()`` on all but the
  last micro-batch, op ``step``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn.functional as F

from dp_overhead_common import hvdllm_config, hvdllm_world, micro_batches, threads, tuning_env


def _plain_model_and_optimizer(settings: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """hvdllm's reference GPT and a textbook AdamW, built the way a user script would."""
    from hvdllm.torch.models import GPT, GPTConfig

    torch.manual_seed(settings["seed"])
    model = GPT(GPTConfig(vocab_size=settings["vocab_size"], seq_len=settings["seq_len"],
                          n_layer=settings["n_layer"], n_head=settings["n_head"],
                          d_model=settings["d_model"], dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"],
                            betas=(settings["beta1"], settings["beta2"]), eps=settings["eps"],
                            weight_decay=settings["weight_decay"])
    return model, opt


class _EngineSide:
    """hvdllm's own engine, built exactly as ``hvdllm train`` builds it."""

    world = 1

    def __init__(self, settings: dict[str, Any]):
        from hvdllm.common.launch import horovod_carries_gradients
        from hvdllm.common.topology import Topology
        from hvdllm.torch.distributed import init_groups
        from hvdllm.torch.engine import build_engine

        comm = hvdllm_world()  # first use of MPI in this process, as in `hvdllm train`
        world = settings.get("world", self.world)  # --scaling runs this side at 4 ranks
        n_threads = threads(comm)
        os.environ.setdefault("OMP_NUM_THREADS", str(n_threads))
        cfg = hvdllm_config(settings, world, "torch")
        # Horovod's cycle as `hvdllm train` sets it for this config.
        self.groups = init_groups(Topology(world), comm, 300.0,
                                  horovod_dp=horovod_carries_gradients(cfg.train, "torch"))
        self.engine = build_engine(cfg, self.groups, threads=n_threads)
        self.lr = settings["lr"]
        self.batches = micro_batches(settings, comm.Get_rank())
        for _ in range(settings["setup_steps"]):
            self.step()
        self.info = {"threads": torch.get_num_threads(), "num_params": self.engine.num_params,
                     "env": tuning_env()}
        self.ops = {"step": self.step}

    def prepare(self, op: str, args: dict[str, Any]) -> None:
        pass

    def step(self) -> None:
        self.engine.train_step(self.batches, self.lr)

    def close(self) -> None:
        pass


class Engine1Side(_EngineSide):
    world = 1


class Engine2Side(_EngineSide):
    world = 2

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        self.ops["sync"] = self.sync

    def sync(self) -> None:
        """hvdllm's gradient sync of a whole step with no compute left to overlap.

        After any ``train_step`` every parameter holds a gradient and no
        allreduce is in flight.  ``GradientSync.wait()`` then starts every
        part of the step's gradient allreduce that the backward hooks would
        have started (here: all of it, over the transport training uses) and
        waits for it: the hooks' path in training, minus the backward pass
        that hides part of it.
        """
        self.engine.update.sync.wait()


class Plain1Side:
    """A textbook single-process PyTorch loop on the same model and batch."""

    world = 1

    def __init__(self, settings: dict[str, Any]):
        torch.set_num_threads(threads())
        self.model, self.opt = _plain_model_and_optimizer(settings)
        self.batches = micro_batches(settings, 0)
        for _ in range(settings["setup_steps"]):
            self.step()
        self.info = {"threads": torch.get_num_threads()}
        self.ops = {"step": self.step}

    def prepare(self, op: str, args: dict[str, Any]) -> None:
        pass

    def step(self) -> None:
        n = len(self.batches)
        for x, y in self.batches:
            loss = self.model.loss(torch.from_numpy(x), torch.from_numpy(y))
            (loss / n).backward()
        self.opt.step()
        self.opt.zero_grad()
        loss.item()

    def close(self) -> None:
        pass


class Ddp2Side:
    """``torch.nn.parallel.DistributedDataParallel`` on gloo, used the documented way.

    Rank and world size come from Open MPI's environment.  The rendezvous
    store is opened by rank 0 on a port the kernel picks and holds from then
    on (``TCPStore`` with port 0); rank 1 learns the port over MPI.  Nothing
    picks a port that could be taken before it is bound, which once made
    this side fail with ``EADDRINUSE``.  Gradient accumulation uses
    ``no_sync()`` for every micro-batch but the last, so DDP communicates
    once per optimizer step, like hvdllm.
    """

    world = 2

    def __init__(self, settings: dict[str, Any]):
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
        size = int(os.environ["OMPI_COMM_WORLD_SIZE"])
        from mpi4py import MPI

        torch.set_num_threads(threads())
        host = "127.0.0.1"
        store = (dist.TCPStore(host, 0, size, is_master=True, wait_for_workers=False)
                 if rank == 0 else None)
        port = MPI.COMM_WORLD.bcast(store.port if store is not None else None, root=0)
        if store is None:
            store = dist.TCPStore(host, port, size, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size)
        self.dist = dist
        model, _ = _plain_model_and_optimizer(settings)
        self.ddp = DistributedDataParallel(model)
        self.opt = torch.optim.AdamW(self.ddp.parameters(), lr=settings["lr"],
                                     betas=(settings["beta1"], settings["beta2"]),
                                     eps=settings["eps"], weight_decay=settings["weight_decay"])
        self.batches = micro_batches(settings, rank)
        for _ in range(settings["setup_steps"]):
            self.step()
        self.info = {"threads": torch.get_num_threads()}
        self.ops = {"step": self.step}

    def prepare(self, op: str, args: dict[str, Any]) -> None:
        pass

    def step(self) -> None:
        n = len(self.batches)
        for i, (x, y) in enumerate(self.batches):
            ctx = self.ddp.no_sync() if i < n - 1 else contextlib.nullcontext()
            with ctx:
                logits = self.ddp(torch.from_numpy(x))
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                       torch.from_numpy(y).reshape(-1))
                (loss / n).backward()
        self.opt.step()
        self.opt.zero_grad()
        loss.item()

    def close(self) -> None:
        self.dist.destroy_process_group()


SIDES = {"engine1": Engine1Side, "plain1": Plain1Side, "engine2": Engine2Side,
         "ddp2": Ddp2Side}
