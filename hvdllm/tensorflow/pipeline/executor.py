"""The TensorFlow pipeline executor: walk one stage's action list for a training step.

The action list comes from :func:`hvdllm.common.schedules.build_schedule`
and the walk over it, the messages and their tags are the core's
(:class:`hvdllm.common.stage_walk.StageWalker`), the same as for the torch
executor.  This module runs the chunks.

Each chunk's forward is a traced ``tf.function`` per input shape.  The
last chunk (head and loss) runs its forward and backward in one traced
graph at its forward: its backward, which every schedule puts after it,
only hands the input gradient on, and nothing is held in between.  What
another chunk keeps between the forward and the backward of a
``(micro-batch, chunk)`` pair depends on ``recompute``:

* off (the default): the forward graph runs under an eager
  ``tf.GradientTape``.  TensorFlow then runs the variant of the graph that
  also outputs the intermediate tensors its gradient needs, and the tape
  holds them until the backward, which is the traced gradient graph of the
  forward (one call, no forward recomputed).  The tape is dropped as soon
  as the backward has run, so a stage holds the activations of exactly the
  pairs its schedule has in flight.
* ``"full"``: the forward graph runs without a tape and the stage keeps
  only the chunk's input.  The backward is another traced graph that runs
  the chunk again under a tape and returns the gradients.  Dropout masks
  are the forward's: the chunk's random-generator states are put back to
  what the forward saw while it runs.

The last chunk's loss is seeded with ``loss_scale / m`` (as in gradient
accumulation).  Each chunk's variable gradients are added into running
sums in the graph that computes them (the last chunk's and recompute's),
or in one traced call after the tape's gradient; :meth:`PipelineExecutor.train_step`
returns the sums aligned with :attr:`PipelineExecutor.variables`.  The
step's mean loss is broadcast from the last stage so every rank can log it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from ...common.comm import Group
from ...common.schedules import RECV_ACT, RECV_GRAD, SEND_ACT, chunk_location
from ...common.stage_walk import StageWalker
from ..models import CausalLM
from .p2p import StageLink, TensorSpec
from .stage import Chunk, run_chunk


class _ChunkGraphs:
    """The traced graphs of one chunk, per input shape.

    Args:
        model: the stage's cut model.
        chunk: the chunk.
        variables: the stage's trainable variables (gradients are given by
            position in this list).
        recompute: build the backward that runs the chunk again.
    """

    def __init__(self, model: CausalLM, chunk: Chunk, variables: Sequence[Any], recompute: bool):
        self.chunk = chunk
        self.recompute = recompute
        blocks = {b.name: b for b in model.blocks}
        layers = tuple(blocks[key] for key in chunk.keys)
        self._position = {id(v.value): i for i, v in enumerate(variables)}
        self._run = lambda *args: run_chunk(model, chunk, layers, *args)
        self._forward = tf.function(self._run, autograph=False)
        self._gradients = tf.function(self._gradients_graph, autograph=False)
        self._sum = tf.function(self._sum_graph, autograph=False)
        self._traced: dict[tuple, Any] = {}
        self._traced_gradients: dict[tuple, Any] = {}
        self._traced_sum: dict[tuple, Any] = {}
        self.sources: list = []      # the tf.Variables the chunk trains
        self.indices: list[int] = []  # their positions in the stage's variables
        self.states: list = []       # random-generator states it reads (dropout)
        self.loss_dtype: tf.DType = tf.float32

    def forward(self, args: tuple) -> tuple[tf.Tensor, Any]:
        """The chunk's output for ``args``, and what its backward needs."""
        graph = self._graph(self._traced, self._forward, args)
        if self.recompute:
            states = [tf.identity(s) for s in self.states]
            return graph(*args), (args, states)
        tape = tf.GradientTape(watch_accessed_variables=False)
        with tape:
            if not self.chunk.first:
                tape.watch(args[0])
            tape.watch(self.sources)
            out = graph(*args)
        return out, (tape, args[0])

    def forward_backward(self, args: tuple, seed: float,
                         sums: list | None) -> tuple[tf.Tensor, tf.Tensor | None, list]:
        """The last chunk's loss, its input gradient and ``sums`` plus its variable gradients.

        One traced graph: nothing is held between the forward and the
        backward of the last chunk, which 1F1B runs back to back anyway.
        ``seed`` is d(scaled step loss) / d(loss); ``sums`` is None for the
        step's first micro-batch.
        """
        self._graph(self._traced, self._forward, args)  # names the chunk's variables
        output_grad = tf.constant(seed, self.loss_dtype)
        grad_args = (args, output_grad, sums or [])
        return self._graph(self._traced_gradients, self._gradients, grad_args)(*grad_args)

    def backward(self, saved: Any, out: tf.Tensor, output_grad: tf.Tensor,
                 sums: list | None) -> tuple[tf.Tensor | None, list]:
        """The gradient of the chunk's input (None for token ids), and ``sums`` plus the
        gradients of its variables (``sums`` None: the step's first backward)."""
        if self.recompute:
            args, states = saved
            current = [tf.identity(s) for s in self.states]
            for var, value in zip(self.states, states):  # the forward's dropout masks
                var.assign(value)
            grad_args = (args, output_grad, sums or [])
            _, input_grad, total = self._graph(self._traced_gradients, self._gradients,
                                               grad_args)(*grad_args)
            for var, value in zip(self.states, current):
                var.assign(value)
            return input_grad, total
        tape, inputs = saved
        sources = self.sources if self.chunk.first else [inputs] + self.sources
        grads = tape.gradient(out, sources, output_gradients=output_grad)
        input_grad, grads = (None, grads) if self.chunk.first else (grads[0], grads[1:])
        # Embedding gradients are IndexedSlices, a variable the chunk does not
        # reach has None: densified and summed in one traced call.
        sum_args = (list(grads), sums or [])
        key = tuple(type(g).__name__ for g in grads)
        return input_grad, self._graph(self._traced_sum, self._sum, sum_args, key)(*sum_args)

    def _graph(self, cache: dict, function: Any, args: tuple, key: tuple = ()) -> Any:
        """``function`` traced for the shapes of ``args`` (once per shape)."""
        key += tuple((tuple(a.shape), a.dtype) for a in tf.nest.flatten(args))
        graph = cache.get(key)
        if graph is None:
            graph = cache[key] = function.get_concrete_function(*args)
            if function is self._forward and len(cache) == 1:  # the forward, traced first
                self._read_variables(graph)
                if self.chunk.last:
                    self.loss_dtype = graph.structured_outputs.dtype
        return graph

    def _read_variables(self, graph: Any) -> None:
        for var in graph.variables:
            if var.trainable:
                if id(var) not in self._position:
                    raise RuntimeError(f"pipeline chunk {self.chunk.index} reads the variable "
                                       f"{var.name}, which is not one of its stage's")
                self.sources.append(var)
                self.indices.append(self._position[id(var)])
            else:
                self.states.append(var)

    def _sum_graph(self, grads: list, sums: list) -> list:
        """``sums + grads`` (just ``grads`` when ``sums`` is empty), as dense tensors."""
        dense = [tf.zeros(s.shape, s.dtype) if g is None else tf.convert_to_tensor(g)
                 for g, s in zip(grads, self.sources)]
        return [a + b for a, b in zip(sums, dense)] if sums else dense

    def _gradients_graph(self, args: tuple, output_grad: tf.Tensor, sums: list) -> tuple:
        """Run the chunk under a tape: output, input gradient, ``sums`` plus variable gradients."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            if not self.chunk.first:
                tape.watch(args[0])
            tape.watch(self.sources)
            out = self._run(*args)
        inputs = [] if self.chunk.first else [args[0]]
        grads = tape.gradient(out, inputs + self.sources, output_gradients=output_grad)
        input_grad = None if self.chunk.first else grads[0]
        return out, input_grad, self._sum_graph(grads[len(inputs):], sums)


class PipelineExecutor(StageWalker):
    """Runs one pipeline stage: its chunks of the model and its schedule.

    Args:
        model: this stage's cut model (see :func:`~hvdllm.tensorflow.pipeline.stage.cut_stage`).
        chunks: the chunks it holds, in local order.
        group: the pipeline group; this rank is stage ``group.rank``.
        activation_spec: dtype and shape of the tensors crossing a chunk
            boundary for one micro-batch (activations and their gradients).
        schedule: "gpipe", "1f1b" or "interleaved".
        virtual_stages: chunks per stage.
        recompute: run each chunk again in its backward instead of keeping
            its activations.
        tied_variable: the GPT head/embedding weight this stage holds when
            it is the first or the last stage, else None.
        verbose: print warnings (give it to one rank only).
    """

    def __init__(self, model: CausalLM, chunks: Sequence[Chunk], group: Group,
                 activation_spec: TensorSpec, schedule: str = "1f1b", virtual_stages: int = 1,
                 recompute: bool = False, tied_variable: Any = None, verbose: bool = False):
        self.model = model
        self.chunks = list(chunks)
        self.recompute = recompute
        #: This stage's trainable variables, each once, in the model's order.
        self.variables = list({id(v): v for v in model.trainable_variables}.values())
        self._graphs = [_ChunkGraphs(model, c, self.variables, recompute) for c in self.chunks]
        link = StageLink(group)
        # Self-describing messages on the link's communicator, for generation.
        self._control = Group(group.kind, link.comm, group.ranks, timeout_sec=group.timeout_sec)
        self.tied_variable = tied_variable
        self.tied_peer = None
        if tied_variable is not None:
            self.tied_peer = group.size - 1 if group.rank == 0 else 0
        super().__init__(link, activation_spec, [c.index for c in self.chunks], schedule,
                         virtual_stages, verbose)

    # -- one training step ---------------------------------------------------
    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                   loss_scale: float = 1.0) -> tuple[float, list[tf.Tensor]]:
        """Forward and backward of every micro-batch through this stage.

        Args:
            micro_batches: (inputs, targets) int arrays, the same on every stage.
            loss_scale: multiplies the loss before backward (fp16 loss
                scaling; the scale reaches every stage through the
                gradients it sends, and the returned gradients carry it).

        Returns:
            The step's loss (mean over micro-batches, on every stage) and
            the gradients of ``loss_scale * loss``, aligned with
            :attr:`variables`.
        """
        m = len(micro_batches)
        step = _StepState(micro_batches, len(self.variables), loss_scale / m)
        self.walk(m, step.recvs, lambda mb, c: self._forward(step, mb, c),
                  lambda mb, c: self._backward(step, mb, c),
                  lambda kind, mb, c: (step.held[mb, c][1] if kind is SEND_ACT
                                       else step.input_grads.pop((mb, c))))
        if step.held or step.input_grads:
            raise RuntimeError(f"pipeline stage {self.stage}: the schedule left work behind: "
                               f"{sorted(step.held)} {sorted(step.input_grads)}")
        grads = [tf.zeros(v.shape, v.dtype) if g is None else g
                 for g, v in zip(step.grads, self.variables)]
        return self.shared_loss(step.losses, m), grads

    def _forward(self, step: "_StepState", mb: int, c: int) -> None:
        chunk, graphs = self.chunks[c], self._graphs[c]
        x, y = step.micro_batches[mb]
        if chunk.first:
            inputs = tf.convert_to_tensor(x)
        else:
            inputs = step.recvs.pop((RECV_ACT, mb, c)).wait()
        if chunk.last:  # forward and backward in one graph; the backward hands on its result
            loss, input_grad, total = graphs.forward_backward(
                (inputs, tf.convert_to_tensor(y)), step.seed, step.sums(graphs))
            step.store(graphs, total)
            step.losses[mb] = float(loss)
            step.held[mb, c] = (input_grad, None)
            return
        step.held[mb, c] = graphs.forward((inputs,))[::-1]

    def _backward(self, step: "_StepState", mb: int, c: int) -> None:
        saved, out = step.held.pop((mb, c))
        graphs = self._graphs[c]
        if self.chunks[c].last:
            input_grad = saved
        else:
            output_grad = step.recvs.pop((RECV_GRAD, mb, c)).wait()
            input_grad, total = graphs.backward(saved, out, output_grad, step.sums(graphs))
            step.store(graphs, total)
        if input_grad is not None:
            step.input_grads[mb, c] = input_grad

    # -- tied embedding -------------------------------------------------------
    def reduce_tied_grads(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        """Sum the tied head/embedding gradient of the first and last stages (both get it).

        Call after the data-parallel average and before the optimizer step.
        Both stages add the same two tensors, so their copies stay bit-equal.

        Args:
            grads: this stage's gradients, aligned with :attr:`variables`.

        Returns:
            ``grads`` with the tied variable's entry summed over the two stages.
        """
        if self.tied_variable is None:
            return grads
        i = next(i for i, v in enumerate(self.variables) if v is self.tied_variable)
        other = self.link.exchange(tf.convert_to_tensor(grads[i]), self.tied_peer,
                                   self.tied_tag(), "tied embedding gradient")
        return grads[:i] + [grads[i] + other] + grads[i + 1:]

    # -- evaluation -------------------------------------------------------------
    def eval_loss(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
        """Forward-only mean loss of ``micro_batches``, returned on every stage.

        Each micro-batch goes through the chunks in model order, one after
        the other, eagerly and with dropout off; activations move with the
        group's self-describing point-to-point calls, as in
        :meth:`forward_logits`.  The last stage computes the losses.
        """
        p, control = self.num_stages, self._control
        blocks = {b.name: b for b in self.model.blocks}
        losses: dict[int, float] = {}
        for mb, (x, y) in enumerate(micro_batches):
            for g in range(self.num_chunks):
                stage, c = chunk_location(g, p)
                if stage != self.stage:
                    continue
                chunk = self.chunks[c]
                if chunk.first:
                    inputs = tf.convert_to_tensor(x)
                else:
                    inputs = tf.convert_to_tensor(control.recv((stage - 1) % p, tag=g))
                out = run_chunk(self.model, chunk, [blocks[k] for k in chunk.keys], inputs,
                                tf.convert_to_tensor(y) if chunk.last else None, training=False)
                if chunk.last:
                    losses[mb] = float(out)
                else:
                    control.send(np.ascontiguousarray(tf.cast(out, tf.float32).numpy()),
                                 (stage + 1) % p, tag=g + 1)
        return self.shared_loss(losses, len(micro_batches))

    # -- inference ------------------------------------------------------------
    def language_model(self) -> "PipelinedLM":
        """An object whose ``generate`` samples through the whole pipeline (every stage calls it)."""
        return PipelinedLM(self)

    def forward_logits(self, idx: Any) -> tf.Tensor:
        """Logits of ``idx`` (b, t) through every chunk, returned on every stage.

        Messages carry their own shape here (sequence lengths vary), so this
        uses the group's self-describing point-to-point calls, and the
        layers run eagerly.
        """
        p, control = self.num_stages, self._control
        idx = tf.convert_to_tensor(idx)
        x = None
        for g in range(self.num_chunks):
            stage, c = chunk_location(g, p)
            if stage != self.stage:
                continue
            chunk = self.chunks[c]
            if g > 0:
                x = tf.convert_to_tensor(control.recv((stage - 1) % p, tag=g))
            x = self.model.embed(idx, training=False) if chunk.first else x
            blocks = {b.name: b for b in self.model.blocks}
            for key in chunk.keys:
                x = blocks[key](x, training=False)
            if g < self.num_chunks - 1:
                control.send(np.ascontiguousarray(x.numpy()), (stage + 1) % p, tag=g + 1)
        logits = self.model.head(x).numpy() if self.stage == p - 1 else None
        return tf.convert_to_tensor(control.broadcast_object(logits, root=p - 1))


class PipelinedLM:
    """Samples through a pipeline with :meth:`CausalLM.generate` (every stage calls it).

    Every stage gets the same logits, so every stage draws the same tokens.
    """

    generate = CausalLM.generate
    check_length = CausalLM.check_length

    def __init__(self, executor: PipelineExecutor):
        self._executor = executor
        self.criterion = executor.model.criterion
        self.seq_len = executor.model.seq_len

    def __call__(self, idx: Any, training: bool = False) -> tf.Tensor:
        self.check_length(idx)
        return self._executor.forward_logits(idx)


class _StepState:
    """What one training step of a stage has in flight, and its gradient sums."""

    def __init__(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                 num_variables: int, seed: float):
        self.micro_batches = micro_batches
        self.seed = seed  # d(scaled step loss) / d(micro-batch loss)
        self.recvs: dict[tuple, Any] = {}
        # (microbatch, chunk) -> (what the backward needs, output); on the last
        # chunk (its input gradient, None)
        self.held: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.input_grads: dict[tuple[int, int], tf.Tensor] = {}
        self.losses: dict[int, float] = {}
        self.grads: list[tf.Tensor | None] = [None] * num_variables

    def sums(self, graphs: _ChunkGraphs) -> list | None:
        """The running gradient sums of a chunk's variables (None before its first backward)."""
        if not graphs.indices or self.grads[graphs.indices[0]] is None:
            return None
        return [self.grads[i] for i in graphs.indices]

    def store(self, graphs: _ChunkGraphs, total: Sequence[tf.Tensor]) -> None:
        """Keep a chunk's new gradient sums."""
        for i, g in zip(graphs.indices, total):
            self.grads[i] = g
