"""What a framework adapter can run, as data the config checks consult.

Each adapter declares its :class:`Capabilities` in a module that imports no
framework (``hvdllm/<framework>/capabilities.py``, a constant named
``CAPABILITIES``), so that ``hvdllm train --dry-run`` and the config loader
stay fast.  :func:`needed_features` lists what a config asks for, as
``(feature, setting)`` pairs; :func:`check_supported` raises one line
naming every setting the chosen adapter does not declare.

Feature names: ``family:<name>``, ``tensor_parallel``,
``sequence_parallel``, ``pipeline``, ``schedule:<name>``,
``partition:<name>``, ``recompute:<name>``, ``optimizer:<name>``,
``compression:<name>``, ``zero:<level>``, ``precision:<name>``,
``grad_clip`` and ``init_from``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .errors import NotImplementedYetError

#: Adapter package of each ``train.framework``.
ADAPTER_PACKAGES = {"torch": "hvdllm.torch", "tensorflow": "hvdllm.tensorflow"}


@dataclass(frozen=True)
class Capabilities:
    """The features one adapter runs.

    Args:
        framework: the ``train.framework`` value.
        features: feature names (see the module docstring).
    """

    framework: str
    features: frozenset[str]

    def supports(self, feature: str) -> bool:
        return feature in self.features


def needed_features(cfg: Any) -> list[tuple[str, str]]:
    """The features ``cfg`` uses, each with the setting that asks for it."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    need = [(f"family:{m.family}", f"model.family={m.family!r}")]
    if m.init_from:
        need.append(("init_from", "model.init_from"))
    if p.tp > 1:
        need.append(("tensor_parallel", f"parallel.tp={p.tp}"))
    if p.sequence_parallel:
        need.append(("sequence_parallel", "parallel.sequence_parallel=true"))
    if p.pp > 1:
        need += [("pipeline", f"parallel.pp={p.pp}"),
                 (f"schedule:{p.schedule}", f"parallel.schedule={p.schedule!r}"),
                 (f"partition:{p.partition}", f"parallel.partition={p.partition!r}")]
    if p.recompute != "none":
        need.append((f"recompute:{p.recompute}", f"parallel.recompute={p.recompute!r}"))
    need.append((f"optimizer:{t.optimizer}", f"train.optimizer={t.optimizer!r}"))
    if t.compression != "none":
        need.append((f"compression:{t.compression}", f"train.compression={t.compression!r}"))
    if t.zero:
        need.append((f"zero:{t.zero}", f"train.zero={t.zero}"))
    if t.precision != "fp32":
        need.append((f"precision:{t.precision}", f"train.precision={t.precision!r}"))
    if t.grad_clip > 0:
        need.append(("grad_clip", f"train.grad_clip={t.grad_clip:g}"))
    return need


def adapter_capabilities(framework: str) -> Capabilities:
    """The declaration of ``framework``'s adapter (no framework is imported)."""
    module = importlib.import_module(ADAPTER_PACKAGES[framework] + ".capabilities")
    return module.CAPABILITIES


def check_supported(cfg: Any) -> None:
    """Raise :class:`NotImplementedYetError` naming every setting the adapter cannot run."""
    caps = adapter_capabilities(cfg.train.framework)
    missing = [setting for feature, setting in needed_features(cfg)
               if not caps.supports(feature)]
    if missing:
        others = [fw for fw in ADAPTER_PACKAGES if fw != caps.framework
                  and all(adapter_capabilities(fw).supports(f) for f, _ in needed_features(cfg))]
        hint = f"; use train.framework={others[0]!r}" if others else ""
        raise NotImplementedYetError(
            f"{', '.join(missing)} with train.framework={caps.framework!r}: not implemented "
            f"yet for {caps.framework}{hint}")
