# MobileNetV2 research workbook. `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# what the reports, the lab and the experiments need (no test tools: ~35 s less to install on 2 cores);
# a dev install (make install, make test) has it too
RUN_STAMP := $(VENV)/.installed-run
PROFILE ?= quick
DATASET ?= auto
EXECUTOR ?=
FACTORS ?=
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder

.DEFAULT_GOAL := help
.PHONY: help install test reports ladder decomposition bench lab clean-reports

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=smoke|quick|gpu|full (default quick), DATASET=auto|cifar10|cifar100|synthetic|<path>,"
	@echo "             EXECUTOR=local|ray (default local, or \$$MNV2_EXECUTOR): how make reports trains the runs,"
	@echo "             FACTORS=mish,triplet,cnsn (default) or any registered activation/attention: the ablation's factors"

define install_venv
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(1)]"
	$(BIN)/python -m ipykernel install --sys-prefix --name mnv2lib --display-name "Python (mnv2lib)" >/dev/null
endef

$(STAMP): pyproject.toml
	$(call install_venv,dev)
	touch $@ $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	$(call install_venv,deploy)
	touch $@

install: $(STAMP) ## create .venv and install the project with its dev extras

test: $(STAMP) ## run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

reports: $(RUN_STAMP) ## train the notebooks' runs, execute every notebook with papermill, regenerate reports/ (PROFILE, DATASET, EXECUTOR, FACTORS)
	$(BIN)/python -m mnv2lib.reports --profile $(PROFILE) --dataset $(DATASET) $(if $(EXECUTOR),--executor $(EXECUTOR)) $(if $(FACTORS),--factors $(FACTORS))

ladder: $(RUN_STAMP) ## train the budget ladder (quick, 2x, 4x, 8x, 16x budgets; hours on 2 cores: run it in the background); notebook 04 plots it
	$(BIN)/python -m mnv2lib.experiments ladder --dataset $(DATASET)

decomposition: $(RUN_STAMP) ## train every part of notebook 04's decomposition (make reports trains CNSN's; ~17 min more on 2 cores)
	$(BIN)/python -m mnv2lib.experiments decomposition --profile $(PROFILE) --dataset $(DATASET)

bench: $(RUN_STAMP) ## speed benchmark of Mish, Triplet Attention and CNSN -> reports/bench.json
	$(BIN)/python -m mnv2lib.benchmarks.speed

lab: $(RUN_STAMP) ## open the notebooks in JupyterLab (kernel "Python (mnv2lib)")
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean-reports: ## delete generated reports (keeps finished experiment records in reports/results/)
	rm -rf reports/notebooks reports/figures/*/ reports/README.md
