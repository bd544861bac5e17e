# hvdllm: `make demo` trains a tiny GPT on 2 ranks; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2
FRAMEWORK ?= torch
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Open MPI refuses to run as root unless told it is fine (containers, CI).
ifeq ($(shell id -u),0)
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
endif

.PHONY: setup demo test test-all test-horovod-examples test-docker test-multinode test-slurm bench clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	horovodrun -np $(NP) -H localhost:$(NP) $(PY) -m hvdllm train \
	    --config configs/demo.toml --set parallel.dp=$(NP) --set train.framework=$(FRAMEWORK)

test: setup
	$(PY) -m pytest tests -q -ra

test-all: setup
	$(PY) -m pytest tests -q -ra -m "slow or not slow"

# Horovod's own TensorFlow 2 examples through the drop-ins: HOROVOD_EXAMPLES is
# the examples/ directory of a Horovod v0.28.1 checkout (tests/horovod_examples/).
test-horovod-examples:
	@test -d "$(HOROVOD_EXAMPLES)/tensorflow2" || { echo "test-horovod-examples: HOROVOD_EXAMPLES='$(HOROVOD_EXAMPLES)' is not a Horovod v0.28.1 examples/ directory" >&2; exit 2; }
	@$(MAKE) --no-print-directory setup
	HVDLLM_HOROVOD_EXAMPLES="$(abspath $(HOROVOD_EXAMPLES))" $(PY) -m pytest tests/test_horovod_examples.py -q -ra -m horovod_examples

# The Docker images (docker/, docs/docker.md): builds the base (debootstrap
# when no registry is reachable) and the CPU image, then runs `make demo` and
# a 2-rank TensorFlow run in it.  Needs root or the docker group; slow.
test-docker: setup
	HVDLLM_DOCKER_TESTS=1 $(PY) -m pytest tests/test_docker.py -q -ra -m "slow or not slow"

bench: setup
	$(PY) benchmarks/dp_overhead.py

clean:
	rm -rf runs .pytest_cache

# Two simulated hosts (network namespaces joined by a veth pair) on this
# machine; needs root, `ip` and `unshare` (docs/multinode.md).
test-multinode: setup
	HVDLLM_MULTINODE=1 $(PY) -m pytest tests/test_multinode.py -q -ra -m multinode

# The sbatch scripts in examples/slurm/ on a one-node Slurm started by the test
# (Debian's slurm-wlm, munge and PMIx, installed with apt-get when missing;
# needs root; docs/clusters.md).
test-slurm: setup
	bash tests/slurm/install_slurm.sh
	HVDLLM_SLURM=1 $(PY) -m pytest tests/test_slurm.py -q -ra -m slurm
