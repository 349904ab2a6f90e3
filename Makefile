# dealstream: developer and CI entry points. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DURATION ?= 60
RATE ?= 200
CLUSTER_WORKERS ?= 0
TEST_JOBS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_JOBS) --dist loadfile

.DEFAULT_GOAL := help
.PHONY: help install services services-stop services-status cluster cluster-stop cluster-status \
	topics demo test test-unit test-integration test-secure chaos chaos-short lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(BIN)/dealstream: pyproject.toml native/pyproject.toml native/Cargo.toml native/Cargo.lock $(wildcard native/src/*.rs)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q ./native
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

$(BIN)/kustomize: deploy/k8s/tools.sh $(BIN)/dealstream
	bash deploy/k8s/tools.sh

install: $(BIN)/dealstream $(BIN)/kustomize ## create .venv: dealstream (dev extras), native/ (needs cargo), kustomize

services: $(BIN)/dealstream ## start local Kafka (KRaft, from Maven Central jars) and Redis; idempotent
	PYTHON=$(BIN)/python bash deploy/services.sh start

services-stop: ## stop the local Kafka and Redis that `make services` started
	bash deploy/services.sh stop

services-status: ## say whether Kafka and Redis are up and answering
	bash deploy/services.sh status

cluster: $(BIN)/dealstream ## 3 Kafka brokers (KRaft) + Redis Cluster (3 primaries, 3 replicas); CLUSTER_WORKERS=3 adds workers
	PYTHON=$(BIN)/python DEALSTREAM_CLUSTER_WORKERS=$(CLUSTER_WORKERS) bash deploy/cluster.sh start

cluster-stop: ## stop everything `make cluster` started (its data stays in .dealstream/cluster)
	bash deploy/cluster.sh stop

cluster-status: ## say which brokers, Redis nodes, workers of `make cluster` are up
	PYTHON=$(BIN)/python bash deploy/cluster.sh status

topics: services ## create the contract's topics
	$(BIN)/dealstream topics

demo: services ## worker + simulator on real Kafka/Redis, printing offers (DURATION=60 RATE=200)
	$(BIN)/dealstream demo --duration $(DURATION) --rate $(RATE)

test: services $(BIN)/kustomize ## the whole suite: unit + integration + e2e against real services (TEST_JOBS=2 processes)
	$(PYTEST)

test-unit: $(BIN)/dealstream $(BIN)/kustomize ## unit tests only (no services needed)
	$(PYTEST) tests/unit

test-integration: services ## integration and e2e tests only
	$(PYTEST) tests/integration tests/e2e

test-secure: $(BIN)/dealstream ## tests/e2e against a TLS/SASL Kafka and a TLS + ACL Redis made for the run
	@dir=$$(mktemp -d /tmp/dealstream-secure.XXXXXX); \
	trap 'bash deploy/secure-services.sh stop "$$dir"; rm -rf "$$dir"' EXIT; \
	bash deploy/secure-services.sh start "$$dir" && \
	set -a && . "$$dir/env" && set +a && \
	$(PYTEST) tests/e2e

chaos: $(BIN)/dealstream ## chaos suite: 500,000 events through `make cluster`'s topology with faults; bench/results/chaos.json
	@mkdir -p bench/results
	CHAOS_EVENTS=$${CHAOS_EVENTS:-500000} CHAOS_RESULTS=bench/results/chaos.json \
		$(BIN)/pytest -q -s -m chaos tests/chaos

chaos-short: $(BIN)/dealstream ## the chaos suite's short form: 30,000 events, one fault of each kind (about 3 min)
	$(BIN)/pytest -q -s -m chaos tests/chaos

lint: $(BIN)/dealstream ## ruff and mypy (strict)
	$(BIN)/ruff check engine streams tests bench deploy
	$(BIN)/ruff format --check engine streams tests bench deploy
	$(BIN)/mypy

bench: services ## benchmarks: write bench/results/*.json, print one table (BENCH_E2E_ARGS=--quick)
	@mkdir -p bench/results
	$(BIN)/python bench/bench_validation.py
	$(BIN)/python bench/bench_features.py --no-in-memory
	$(BIN)/python bench/bench_durability.py
	$(BIN)/python bench/bench_engine.py
	$(BIN)/python bench/bench_e2e.py $(BENCH_E2E_ARGS)
	$(BIN)/python bench/bench_backtest.py $(BENCH_BACKTEST_ARGS)
	@$(BIN)/python bench/report.py

clean: ## remove caches (keeps .venv and the services' state)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
