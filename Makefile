# meddiffuse — one venv, embedded defaults, offline.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench bench-full clean

install: $(STAMP)

# Re-runs are no-ops: the stamp is newer than the files that define the install.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m meddiffuse.demo

test: install k8s-validate
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench --scale small

bench-full: install
	$(BIN)/python -m bench --scale full

clean:
	rm -rf .meddiffuse .pytest_cache

# Prefect: both work pools (the GPU pool with k8s/prefect/gpu-job-template.json and a concurrency limit of
# GPU_NODES, one GPU job per GPU node) and every deployment of flows/prefect.yaml, applied to the server at
# PREFECT_API_URL (else the active Prefect profile's). See docs/FLOWS.md.
GPU_NODES ?= 1

.PHONY: prefect-deploy
prefect-deploy: export MEDDIFFUSE_GPU_IMAGE ?= meddiffuse/meddiffuse:0.1.0-cuda
prefect-deploy: export MEDDIFFUSE_IMAGE_WORKDIR ?= /app
prefect-deploy: export MEDDIFFUSE_K8S_NAMESPACE ?= meddiffuse
prefect-deploy: install
	$(BIN)/prefect work-pool create meddiffuse-process --type process --overwrite
	$(BIN)/prefect work-pool create meddiffuse-gpu --type kubernetes \
		--base-job-template k8s/prefect/gpu-job-template.json --overwrite
	$(BIN)/prefect work-pool set-concurrency-limit meddiffuse-gpu $(GPU_NODES)
	$(BIN)/prefect --no-prompt deploy --all --prefect-file flows/prefect.yaml

# Deployment checks, offline (deploy/validate.py): kustomize render, kubernetes-validate, policies,
# hadolint, checkov (own venv: its pins clash with the project's), docker-compose config, compose schema.
CHECKOV_VENV  := $(VENV)/tools/checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: k8s-validate
k8s-validate: install $(CHECKOV_STAMP)
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "k8s-validate: installing Debian's docker-compose (offline compose check)"; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose)) \
	      >/dev/null 2>&1 || echo "k8s-validate: apt-get could not install docker-compose; that check is skipped"; \
	  else echo "k8s-validate: docker-compose absent and apt-get unusable (not root); that check is skipped"; fi; }
	BC_SKIP_MAPPING=TRUE $(BIN)/python deploy/validate.py --checkov $(CHECKOV_VENV)/bin/checkov

$(CHECKOV_STAMP): deploy/checkov.lock
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet -c deploy/checkov.lock checkov
	touch $(CHECKOV_STAMP)

# The whole platform on this machine without Docker (#15): S3 (MinIO if `minio` is on PATH, else moto), MLflow
# and Prefect servers (PostgreSQL when reachable, else SQLite), a process worker with the deployments applied,
# and the three services; state, PIDs and logs under .meddiffuse/stack/. See docs/PLATFORM.md.
.PHONY: stack stack-down stack-status e2e
stack: install
	$(BIN)/python -m deploy.stack up

stack-down:
	$(BIN)/python -m deploy.stack down

stack-status:
	$(BIN)/python -m deploy.stack status

# End to end, as a user (tests/e2e): a fresh stack on free ports, the study deployment, the MLflow UI in headless
# Chromium (Debian's, never a downloaded browser), an S3 outage, kill -9 of a service, teardown. Installs Debian's
# chromium when missing and this runs as root with apt; else skips with the reason.
CHROMIUM ?= /usr/bin/chromium
e2e: install
	@if [ ! -x "$(CHROMIUM)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "e2e: $(CHROMIUM) is missing; installing Debian's chromium (apt-get install -y chromium)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/tmp/meddiffuse-e2e-apt.log 2>&1 \
			|| echo "e2e: apt-get install chromium failed (log: /tmp/meddiffuse-e2e-apt.log)"; \
	fi
	@if [ ! -x "$(CHROMIUM)" ]; then \
		echo "e2e SKIPPED: $(CHROMIUM) is missing (apt-get install -y chromium as root); the e2e drives the MLflow and Prefect UIs in it"; \
	elif [ ! -x "$(BIN)/moto_server" ] && ! command -v minio >/dev/null 2>&1; then \
		echo "e2e SKIPPED: no S3 server: neither minio on PATH nor $(BIN)/moto_server (pip install 'moto[server]')"; \
	else \
		MEDDIFFUSE_E2E=1 MEDDIFFUSE_E2E_CHROMIUM="$(CHROMIUM)" $(BIN)/python -m pytest tests/e2e -v -p no:cacheprovider \
			--durations=0; \
	fi

# The three BentoML services on localhost against the embedded defaults: generator :3001, trainer :3002,
# explainer :3003 (python -m services prints their URLs; Ctrl-C stops them by PID). See docs/SERVICES.md.
.PHONY: serve
serve: install
	$(BIN)/python -m services
