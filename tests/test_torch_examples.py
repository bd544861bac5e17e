"""The drop-in ``hvdllm.torch`` wrapper: the examples and a Horovod-style script.

* torch_examples/train_hvd.py is train_single.py plus at most five lines,
  and under horovodrun its ranks end with identical parameters and a
  falling loss;
* a script written for horovod.torch runs with only its import swapped;
* importing hvdllm.torch does not import Horovod.
"""
import difflib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, base_env, horovodrun_prefix, mpirun_prefix, run_ok

pytestmark = pytest.mark.multirank
EXAMPLES = REPO / "torch_examples"
SCRIPTS = Path(__file__).parent / "mpi_scripts"


def test_hvd_example_adds_at_most_five_lines():
    single = (EXAMPLES / "train_single.py").read_text().splitlines()
    hvd = (EXAMPLES / "train_hvd.py").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(single, hvd, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert 0 < len(changed) <= 5, changed
    assert all(line.startswith("+") for line in changed), changed
    assert "+import hvdllm.torch as hvd" in changed


def test_readme_shows_the_current_diff():
    single = (EXAMPLES / "train_single.py").read_text().splitlines(keepends=True)
    hvd = (EXAMPLES / "train_hvd.py").read_text().splitlines(keepends=True)
    diff = "".join(difflib.unified_diff(single, hvd, "train_single.py", "train_hvd.py"))
    assert f"```diff\n{diff}```" in (EXAMPLES / "README.md").read_text()


def test_hvd_example_under_horovodrun():
    res = run_ok(horovodrun_prefix(2) + [sys.executable, str(EXAMPLES / "train_hvd.py")],
                 timeout=240)
    first = dict(re.findall(r"\[\d+,(\d+)\]<stdout>:\s*first loss ([0-9.]+)", res.stdout))
    final = re.findall(r"\[\d+,(\d+)\]<stdout>:\s*final loss ([0-9.]+) param checksum (\S+)",
                       res.stdout)
    assert sorted(r for r, _, _ in final) == ["0", "1"], res.stdout[-2000:]
    assert len({checksum for _, _, checksum in final}) == 1, final  # identical parameters
    for rank, loss, _ in final:
        assert float(loss) < float(first[rank]) - 1.0, (rank, first[rank], loss)


def test_horovod_style_script_runs_through_the_wrapper():
    script = SCRIPTS / "dpx_horovod_style.py"
    imports = [line for line in script.read_text().splitlines()
               if line.startswith(("import ", "from ")) and ("hvd" in line or "horovod" in line)]
    assert imports == ["import hvdllm.torch as hvd"], imports
    res = run_ok(mpirun_prefix(2) + [sys.executable, str(script)], timeout=180)
    assert res.stdout.count("horovod-style script passed") == 2


def test_importing_hvdllm_torch_does_not_import_horovod():
    code = """
import sys
import hvdllm.torch, hvdllm.torch.engine, hvdllm.torch.zero, hvdllm.torch.precision
from hvdllm.torch import clip, compression
assert "horovod" not in sys.modules, sorted(m for m in sys.modules if "horovod" in m)
sys.modules["horovod"] = None  # as if Horovod were not installed
from hvdllm.common.errors import EnvironmentSetupError
try:
    hvdllm.torch.init
except EnvironmentSetupError as exc:
    print("clean error:", exc)
try:
    hvdllm.torch.no_such_name
except AttributeError:
    print("attribute error")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=base_env(), cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "clean error: Horovod with PyTorch support is not available" in res.stdout, res.stdout
    assert "attribute error" in res.stdout
