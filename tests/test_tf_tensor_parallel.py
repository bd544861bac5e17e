"""TensorFlow tensor parallelism: every mapping, layer and whole model against its dense twin.

``tf_tp_layers_check.py`` under ``mpirun -np 2`` (``-np 4`` in the slow
tier) compares each mirror-pair function, each TP Keras layer and whole GPT
and LLaMA models (full logits, loss and every gradient gathered back to
full) with the dense layers and models built from the same seed, within
1e-5, with and without sequence parallelism, all inside ``tf.function``.
"""
import sys
from pathlib import Path

import pytest

from conftest import mpirun_prefix, run_ok

SCRIPTS = Path(__file__).parent / "mpi_scripts"


@pytest.mark.multirank
@pytest.mark.parametrize("np_", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tf_tp_layers_match_dense(np_):
    res = run_ok(mpirun_prefix(np_) + [sys.executable, str(SCRIPTS / "tf_tp_layers_check.py")],
                 timeout=300)
    assert res.stdout.count("tf tp layer checks passed") == np_, res.stdout


def test_tf_plans_follow_the_family_contract():
    """Every split module has a style; GPT's tied head is entered at the norm that feeds it."""
    from hvdllm.common.family import FAMILIES
    from hvdllm.tensorflow.tensor_parallel import PLANS

    for name, family in FAMILIES.items():
        split = {r.module_pattern for r in family.rules
                 if (r.split != "replicated" or r.role == "positions") and r.tied_to is None}
        tied = {r.module_pattern for r in family.rules if r.tied_to is not None}
        assert split <= set(PLANS[name]), (name, split - set(PLANS[name]))
        assert not tied & set(PLANS[name])
    assert set(PLANS["gpt"]) - {"wte", "wpe"} == {
        "blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc", "blocks.*.mlp.proj", "ln_f"}
    assert "lm_head" in PLANS["llama"] and "norm" not in PLANS["llama"]
