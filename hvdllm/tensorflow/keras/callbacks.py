"""Horovod's Keras callbacks (``horovod.tensorflow.keras.callbacks``) on Keras 3.

Horovod's fail on Keras 3 at the first call (``keras.backend.get_value``
is gone and the learning rate is ``optimizer.learning_rate``).  These keep
Horovod's names, arguments and semantics:

* :class:`BroadcastGlobalVariablesCallback` builds the optimizer (as its
  first step would) and copies the model's and the optimizer's variables
  from ``root_rank`` before the first step, so every rank starts from the
  same state (Horovod's broadcasts after the first step);
* :class:`MetricAverageCallback` averages every numeric epoch log over the
  ranks, in one allreduce;
* :class:`LearningRateScheduleCallback` and
  :class:`LearningRateWarmupCallback` set ``optimizer.learning_rate`` per
  epoch or per batch with Horovod's formulas;
* :class:`BestModelCheckpoint` keeps the best model, written by rank 0 only.

``momentum_correction`` is accepted and not applied: Keras 3 optimizers
read ``momentum`` as a constant when the train step is traced, so changing
it per batch has no effect.
"""
from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from .. import hvd_compat as _compat


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Copy the model's and optimizer's variables from ``root_rank`` when training starts.

    Args:
        root_rank: the rank whose values win.
        device: Horovod's; ignored.
        local_variables: variables to leave alone (per-rank state).
    """

    def __init__(self, root_rank: int, device: str = "", local_variables: Any = None) -> None:
        super().__init__()
        self.root_rank = root_rank
        self.local_ids = {id(v) for v in (local_variables or [])}
        self.broadcast_done = False

    def _broadcast(self) -> None:
        variables = list(self.model.variables)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and optimizer.built:
            variables += list(optimizer.variables)
        seen: set[int] = set()
        chosen = []
        for v in variables:
            if id(v) not in seen and id(v) not in self.local_ids:
                seen.add(id(v))
                chosen.append(v)
        _compat.broadcast_variables(chosen, root_rank=self.root_rank)
        self.broadcast_done = True

    def on_train_begin(self, logs: Any = None) -> None:
        if self.broadcast_done:
            return
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and not optimizer.built and self.model.trainable_variables:
            # What Keras's first apply would do, done first so that the
            # optimizer's state travels too and step one already agrees.
            with keras.name_scope(optimizer.name, caller=optimizer):
                optimizer.build(self.model.trainable_variables)
            optimizer.built = True
        if optimizer is None or optimizer.built:
            self._broadcast()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        # An optimizer first built by the first step: broadcast after it.
        if not self.broadcast_done:
            self._broadcast()


class MetricAverageCallback(keras.callbacks.Callback):
    """Average the epoch's numeric logs (loss, metrics, val_*) over the ranks.

    Put it before callbacks that read the logs (ReduceLROnPlateau,
    ModelCheckpoint, TensorBoard), as with Horovod.  Every rank must log the
    same keys; one that does not is named in a one-line error.

    Args:
        device: Horovod's; ignored.
    """

    def __init__(self, device: str = "") -> None:
        super().__init__()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if not logs:
            return
        keys = sorted(k for k, v in logs.items() if _is_number(v))
        all_keys = _compat.allgather_object(keys)
        if any(k != keys for k in all_keys):
            bad = next(r for r, k in enumerate(all_keys) if k != all_keys[0])
            raise ValueError(f"MetricAverageCallback: rank {bad} logs {all_keys[bad]} but "
                             f"rank 0 logs {all_keys[0]}")
        if not keys:
            return
        values = tf.constant([float(np.asarray(logs[k])) for k in keys], dtype=tf.float64)
        averaged = _compat.allreduce(values, op=_compat.Average,
                                     name=f"hvdllm.metric_average.{epoch}").numpy()
        for k, v in zip(keys, averaged):
            logs[k] = float(v)


def _is_number(value: Any) -> bool:
    try:
        return np.asarray(value).shape == () and np.issubdtype(np.asarray(value).dtype, np.number)
    except (TypeError, ValueError):
        return False


def _learning_rate(optimizer: Any) -> Any:
    lr = getattr(optimizer, "learning_rate", None)
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule) or callable(lr) \
            and not hasattr(lr, "assign"):
        raise ValueError(f"{type(optimizer).__name__}.learning_rate is a schedule; the Horovod "
                         f"learning-rate callbacks need a constant learning rate to set")
    return lr


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Set ``optimizer.learning_rate = initial_lr * multiplier(epoch)`` in [start_epoch, end_epoch).

    Args:
        initial_lr: the learning rate the multiplier scales (None: the
            optimizer's at the start of training).
        multiplier: a number (``lr = initial_lr * multiplier ** (epoch -
            start_epoch)``) or a function of the (fractional) epoch.
        start_epoch, end_epoch: the epochs the schedule covers (end excluded).
        staircase: set once per epoch (True) or per batch, at fractional
            epochs ``epoch + batch / steps_per_epoch`` (False).
        momentum_correction: accepted, not applied (see the module note).
        steps_per_epoch: batches per epoch; by default Keras's ``params``.
    """

    def __init__(self, initial_lr: float | None, multiplier: Any, start_epoch: int = 0,
                 end_epoch: int | None = None, staircase: bool = True,
                 momentum_correction: bool = True, steps_per_epoch: int | None = None) -> None:
        super().__init__()
        self.initial_lr = initial_lr
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.staircase = staircase
        self.momentum_correction = momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = 0
        self.multiplier: Callable[[float], float] = (
            multiplier if callable(multiplier)
            else lambda epoch: multiplier ** (epoch - start_epoch))

    def _steps(self) -> int:
        params = self.params or {}
        if params.get("steps"):
            return int(params["steps"])
        if params.get("samples") and params.get("batch_size"):
            return int(params["samples"]) // int(params["batch_size"])
        raise ValueError(f"{type(self).__name__}: cannot tell the steps per epoch; pass "
                         f"steps_per_epoch=")

    def _set(self, epoch: float) -> None:
        _learning_rate(self.model.optimizer).assign(self.initial_lr * self.multiplier(epoch))

    def on_train_begin(self, logs: Any = None) -> None:
        lr = _learning_rate(self.model.optimizer)
        if self.initial_lr is None:
            self.initial_lr = float(np.asarray(lr))
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self._steps()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.current_epoch = epoch

    def _covers(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if not self._covers(self.current_epoch):
            return
        if not self.staircase:
            self._set(self.current_epoch + batch / self.steps_per_epoch)
        elif batch == 0:
            self._set(self.current_epoch)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(np.asarray(_learning_rate(self.model.optimizer)))


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Ramp the learning rate from ``initial_lr / size`` to ``initial_lr`` over ``warmup_epochs``.

    Goyal et al.'s gradual warm-up, per batch, with Horovod's formula:
    ``lr = initial_lr / size * (e * (size - 1) / warmup_epochs + 1)`` at the
    fractional epoch ``e = epoch + (batch + 1) / steps_per_epoch``.

    Args:
        initial_lr: the learning rate reached at the end of the warm-up
            (usually the single-rank rate times ``size``).
        warmup_epochs: epochs the ramp lasts.
        momentum_correction: accepted, not applied (see the module note).
        steps_per_epoch: batches per epoch; by default Keras's ``params``.
        verbose: rank 0 prints when the warm-up ends.
    """

    def __init__(self, initial_lr: float, warmup_epochs: int = 5,
                 momentum_correction: bool = True, steps_per_epoch: int | None = None,
                 verbose: int = 0) -> None:
        def multiplier(epoch: float) -> float:
            size = _compat.size()
            epoch += 1.0 / self.steps_per_epoch
            return (epoch * (size - 1) / warmup_epochs + 1) / size

        super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=warmup_epochs,
                         staircase=False, momentum_correction=momentum_correction,
                         steps_per_epoch=steps_per_epoch)
        self.warmup_epochs = warmup_epochs
        self.verbose = verbose

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and _compat.rank() == 0:
            lr = float(np.asarray(_learning_rate(self.model.optimizer)))
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {lr:g}.")


class BestModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keep the best model seen so far by ``monitor``; rank 0 writes, the others do nothing.

    Horovod's arguments; ``filepath`` (a ``.keras`` file, or
    ``.weights.h5`` with ``save_weights_only``) is hvdllm's addition,
    since Keras 3 needs one up front.  Put :class:`MetricAverageCallback`
    before it so every rank judges the same averaged value.
    """

    def __init__(self, monitor: str = "val_loss", verbose: int = 0,
                 save_weights_only: bool = False, mode: str = "auto",
                 save_freq: Any = "epoch", filepath: str | None = None) -> None:
        if filepath is None:
            filepath = "best.weights.h5" if save_weights_only else "best.keras"
        super().__init__(filepath=filepath, monitor=monitor, verbose=verbose,
                         save_best_only=True, save_weights_only=save_weights_only, mode=mode,
                         save_freq=save_freq)

    def _save_model(self, *args: Any, **kwargs: Any) -> None:
        if _compat.rank() == 0:
            super()._save_model(*args, **kwargs)
