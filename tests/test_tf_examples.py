"""The TensorFlow / Keras 3 examples in tf_examples/.

* train_hvd.py is train_single.py plus at most eight lines, all added, and
  tf_examples/README.md shows the current diff and an excerpt of
  train_tape.py;
* train_single.py trains in one process with a falling loss;
* under horovodrun at 2 ranks, train_hvd.py (``model.fit`` with
  ``hvdllm.tensorflow.keras``) and train_tape.py (a ``tf.function`` loop
  with ``hvdllm.tensorflow.DistributedGradientTape``) end with identical
  weights on both ranks and a falling loss.
"""
import difflib
import re
import sys

import pytest

from conftest import REPO, horovodrun_prefix, run_ok

EXAMPLES = REPO / "tf_examples"
FIRST = r"\[\d+,(\d+)\]<stdout>:\s*first loss ([0-9.]+)"
FINAL = r"\[\d+,(\d+)\]<stdout>:\s*final loss ([0-9.]+) weights checksum (\S+)"


def test_hvd_example_adds_at_most_eight_lines():
    single = (EXAMPLES / "train_single.py").read_text().splitlines()
    hvd = (EXAMPLES / "train_hvd.py").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(single, hvd, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert 0 < len(changed) <= 8, changed
    assert all(line.startswith("+") for line in changed), changed
    assert "+import hvdllm.tensorflow.keras as hvd" in changed


def test_readme_shows_the_current_diff():
    single = (EXAMPLES / "train_single.py").read_text().splitlines(keepends=True)
    hvd = (EXAMPLES / "train_hvd.py").read_text().splitlines(keepends=True)
    diff = "".join(difflib.unified_diff(single, hvd, "train_single.py", "train_hvd.py"))
    assert f"```diff\n{diff}```" in (EXAMPLES / "README.md").read_text()


def test_readme_tape_excerpt_is_from_the_script():
    readme = (EXAMPLES / "README.md").read_text()
    excerpt = re.search(r"```python\n(import hvdllm.tensorflow as hvd\n.*?)```", readme, re.S)
    assert excerpt, "no train_tape.py excerpt in README.md"
    script = (EXAMPLES / "train_tape.py").read_text().splitlines()
    lines = [line for line in excerpt[1].splitlines() if line.strip() not in ("", "...")]
    assert len(lines) > 10 and all(line in script for line in lines), lines

def test_single_example_in_one_process():
    res = run_ok([sys.executable, str(EXAMPLES / "train_single.py")], timeout=180)
    first = re.search(r"^first loss ([0-9.]+)$", res.stdout, re.M)
    final = re.search(r"^final loss ([0-9.]+) weights checksum (\S+)$", res.stdout, re.M)
    assert first and final, res.stdout[-2000:]
    assert float(final[1]) < float(first[1]) - 0.5, (first[1], final[1])


def two_ranks(script: str) -> tuple[dict[str, str], list[tuple[str, str, str]], str]:
    res = run_ok(horovodrun_prefix(2) + [sys.executable, str(EXAMPLES / script)], timeout=240)
    first = dict(re.findall(FIRST, res.stdout))
    final = re.findall(FINAL, res.stdout)
    assert sorted(first) == ["0", "1"], res.stdout[-2000:]
    assert sorted(r for r, _, _ in final) == ["0", "1"], res.stdout[-2000:]
    assert len({checksum for _, _, checksum in final}) == 1, final  # identical weights
    return first, final, res.stdout


@pytest.mark.multirank
def test_hvd_example_under_horovodrun():
    first, final, out = two_ranks("train_hvd.py")
    # Epoch losses are averaged over the ranks, so both ranks report the same ones.
    assert len(set(first.values())) == 1 and len({loss for _, loss, _ in final}) == 1, out
    for rank, loss, _ in final:
        assert float(loss) < float(first[rank]) - 0.5, (rank, first[rank], loss)
    progress = re.findall(r"\[\d+,(\d+)\]<stdout>:.*/step - loss: ", out)
    assert progress and set(progress) == {"0"}, progress  # Keras progress from rank 0 only


@pytest.mark.multirank
def test_tape_example_under_horovodrun():
    first, final, _ = two_ranks("train_tape.py")
    for rank, loss, _ in final:
        assert float(loss) < float(first[rank]) - 1.0, (rank, first[rank], loss)
