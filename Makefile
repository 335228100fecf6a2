# Two commands on a fresh machine (see README):
#   make run    install into .venv and run the embedded default (CPU, offline but for PyPI)
#   make test   install into .venv (+ the SLURM test cluster packages when root) and run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
# torch first, pinned to the CPU wheel: a bare "torch" requirement pulls several GB of CUDA builds.
TORCH ?= torch==2.13.0

.PHONY: venv run test dryrun report clean-results slurm-packages

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/snakemake --cores $(CORES)

dryrun: venv
	$(VENV)/bin/snakemake -n --cores $(CORES)

report: venv
	$(VENV)/bin/snakemake --report results/snakemake-report.zip

slurm-packages:
	@if [ "$$(id -u)" = 0 ] && [ -x .ci/slurm/install.sh ]; then .ci/slurm/install.sh; \
	else echo "not root or no .ci/slurm/install.sh: SLURM tests will skip"; fi

test: venv slurm-packages
	$(VENV)/bin/pytest -q

clean-results:
	rm -rf results/evals results/models results/merges results/tables results/report results/leaderboard.md .snakemake
