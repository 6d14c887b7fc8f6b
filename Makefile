# Build, install, test and benchmark the calico / calico-ipam CNI plugins.
# Debian's python3: shared libpython for PyInstaller, and the interpreter cost-floor.md measured.
PYTHON ?= /usr/bin/python3
VENV ?= .venv
DESTDIR ?=
BINDIR ?= /opt/cni/bin
# The bundle lives beside the launchers; launchers hold its absolute path, so they keep
# working when copied or symlinked into another directory.
BUNDLE_NAME := calico-bundle
DIST := $(CURDIR)/dist

.PHONY: all venv test-venv build install test lint demo bench clean

all: build

# The venv `make build` needs (PyInstaller); the tests add theirs (test-venv).
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[build]'
	touch $@

test-venv: $(VENV)/.installed-test
$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[build,test]'
	touch $@

build:
	scripts/install-deps build
	rm -rf build/pyinstaller $(DIST)/$(BUNDLE_NAME) $(DIST)/bin
	$(VENV)/bin/pyinstaller --noconfirm --log-level WARN --distpath $(DIST) \
		--workpath build/pyinstaller build.spec
	mkdir -p $(DIST)/bin
	ln -sfn ../$(BUNDLE_NAME)/calico $(DIST)/bin/calico
	ln -sfn ../$(BUNDLE_NAME)/calico $(DIST)/bin/calico-ipam
	ln -sfn ../$(BUNDLE_NAME)/calico $(DIST)/bin/calico-node
	ln -sfn ../$(BUNDLE_NAME)/calico $(DIST)/bin/calicoctl
	ln -sfn ../$(BUNDLE_NAME)/calico $(DIST)/bin/kubectl-calico
	ln -sfn ../$(BUNDLE_NAME)/calico $(DIST)/bin/calico-kube-controllers

install:
	test -x $(DIST)/$(BUNDLE_NAME)/calico || { echo "run 'make build' first" >&2; exit 1; }
	install -d -m 0755 $(DESTDIR)$(BINDIR)
	rm -rf $(DESTDIR)$(BINDIR)/$(BUNDLE_NAME).new
	cp -a $(DIST)/$(BUNDLE_NAME) $(DESTDIR)$(BINDIR)/$(BUNDLE_NAME).new
	rm -rf $(DESTDIR)$(BINDIR)/$(BUNDLE_NAME)
	mv $(DESTDIR)$(BINDIR)/$(BUNDLE_NAME).new $(DESTDIR)$(BINDIR)/$(BUNDLE_NAME)
	ln -sfn $(BUNDLE_NAME)/calico $(DESTDIR)$(BINDIR)/calico
	ln -sfn $(BUNDLE_NAME)/calico $(DESTDIR)$(BINDIR)/calico-ipam
	ln -sfn $(BUNDLE_NAME)/calico $(DESTDIR)$(BINDIR)/calico-node
	ln -sfn $(BUNDLE_NAME)/calico $(DESTDIR)$(BINDIR)/calicoctl
	ln -sfn $(BUNDLE_NAME)/calico $(DESTDIR)$(BINDIR)/kubectl-calico
	ln -sfn $(BUNDLE_NAME)/calico $(DESTDIR)$(BINDIR)/calico-kube-controllers

test: build
	scripts/install-deps test
	scripts/run-tests

lint: test-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: build
	scripts/install-deps demo
	scripts/demo

# One run of each benchmark (bench/README.md); options via CNI_BENCH_ARGS, IPAM_BENCH_ARGS,
# IPAM_SCALE_BENCH_ARGS, NODE_BENCH_ARGS, ROUTE_BENCH_ARGS, POD_BENCH_ARGS.
bench: build
	scripts/install-deps test
	$(VENV)/bin/python bench/cni_bench.py $(CNI_BENCH_ARGS)
	$(VENV)/bin/python bench/ipam_bench.py $(IPAM_BENCH_ARGS)
	$(VENV)/bin/python bench/ipam_scale_bench.py $(IPAM_SCALE_BENCH_ARGS)
	$(VENV)/bin/python bench/node_bench.py $(NODE_BENCH_ARGS)
	$(VENV)/bin/python bench/route_bench.py $(ROUTE_BENCH_ARGS)
	$(VENV)/bin/python bench/pod_bench.py $(POD_BENCH_ARGS)

clean:
	rm -rf build dist
