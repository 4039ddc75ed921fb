# remora: build, test, benchmark and demo. `make help` lists the targets.
GO       ?= go
BIN      := bin
PKGS     := ./...
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: install deb deb-test docs all build test test-unit test-e2e test-kernel bench bench-kernel lab demo lint fuzz fuzz-ci campaign campaign-short soak clean help

all: build

help:
	@echo "build      build bin/remora and bin/labctl"
	@echo "lab        set up the lab on this machine (packages, libvirt, guest image, network)"
	@echo "test       unit tests, then end-to-end tests against real libvirt/QEMU guests (root)"
	@echo "test-unit  unit tests only (no root, no lab)"
	@echo "test-kernel  Plug (sch_plug) and soft-dirty tests in Debian's kernel under QEMU (TCG); fetches the kernel once"
	@echo "bench      Go benchmarks and the checkpoint tables on lab guests, then bench-kernel (root)"
	@echo "bench-kernel  the dirty trackers' cost over a QEMU guest's RAM in Debian's kernel under QEMU (soft-dirty vs scan)"
	@echo "demo       protect a guest, crash its host, fail over (root)"
	@echo "fuzz       run every fuzz target of every package for FUZZTIME each (default 30s)"
	@echo "fuzz-ci    every fuzz target for 5s (part of test)"
	@echo "campaign   the long randomized fault campaign (FAULTS=300, SEED=...), report in out/campaign.txt (root)"
	@echo "campaign-short  the same with 32 faults"
	@echo "soak       no false failover: the default detectors for SOAK (10m) under 50±25 ms and 2% loss on every link, and a negative control (root)"
	@echo "lint       gofmt, go vet, staticcheck, and the build without cgo"
	@echo "install    install the binary, systemd units, example configs, man pages and completions (DESTDIR, PREFIX)"
	@echo "deb        build out/remora_VERSION_ARCH.deb"
	@echo "deb-test   install that package into a fresh Debian 12 root (debootstrap) and run it there (root)"

build:
	$(GO) build -o $(BIN)/remora ./cmd/remora
	$(GO) build -o $(BIN)/labctl ./test/labctl

lab:
	test/lab/lab.sh up

test-unit:
	$(GO) test -count=1 -race $$($(GO) list $(PKGS) | grep -v /test/e2e)

# make test runs a short randomized fault campaign (32 faults of a new
# seed, ~4 minutes; the seed is printed to rerun it); `make campaign` is
# the long one. CAMPAIGN_FAULTS=0 leaves it out; CAMPAIGN_SKIP
# (comma-separated substrings) leaves kinds out.
CAMPAIGN_FAULTS ?= 32
CAMPAIGN_SKIP ?=
test-e2e: lab
	REMORA_E2E=1 REMORA_LAB=1 REMORA_CAMPAIGN_FAULTS=$(CAMPAIGN_FAULTS) REMORA_CAMPAIGN_SKIP="$(CAMPAIGN_SKIP)" $(GO) test -p 1 -count=1 -v -timeout 70m ./test/e2e/ ./test/labkit/ ./checkpoint/outcommit/ ./checkpoint/disk/

# The long fault campaign: FAULTS faults (seed SEED, or a new one printed),
# the report table in out/campaign.txt.
FAULTS ?= 300
campaign-short:
	$(MAKE) campaign FAULTS=32

campaign: lab
	mkdir -p out
	REMORA_E2E=1 REMORA_LAB=1 REMORA_CAMPAIGN_FAULTS=$(FAULTS) REMORA_CAMPAIGN_SEED=$(SEED) REMORA_CAMPAIGN_REPORT=$(CURDIR)/out/campaign.txt \
		$(GO) test -count=1 -v -timeout 4h -run '^TestCampaign$$' ./test/e2e/

# The false-suspicion soak: SOAK of impaired links with the default
# detectors (or SOAK_DETECTOR=INTERVAL,MISSED on every side) must fail
# nothing over; a too-quick detector must (the control).
SOAK ?= 10m
SOAK_DETECTOR ?=
soak: lab
	REMORA_E2E=1 REMORA_LAB=1 REMORA_SOAK=$(SOAK) REMORA_SOAK_DETECTOR=$(SOAK_DETECTOR) $(GO) test -p 1 -count=1 -v -timeout 60m -run '^(TestNoFalseFailover|TestFalseFailoverControl)$$' ./test/e2e/

test: lab lint test-unit fuzz-ci test-kernel test-e2e deb-test

# Every fuzz target for a few seconds: CI's bounded share of `make fuzz`.
fuzz-ci:
	$(MAKE) fuzz FUZZTIME=5s

# Kernel features this host may lack, in Debian's kernel booted under QEMU.
test-kernel:
	GO=$(GO) test/kernelvm/run.sh

# Every fuzz target of every package, FUZZTIME each. A package is fuzzed
# when one of its test files (as go list selects them) declares a Fuzz
# function, so packages such as test/e2e, whose TestMain needs the lab, are
# never built; go test -list names the targets, so a new one runs without
# editing this. A failing target fails the run once all have had a turn;
# one whose only error is the coordinator's end-of-run timeout of a busy
# worker (no failing input written) runs once more.
FUZZTIME ?= 30s
fuzz:
	@listing=$$($(GO) list -f '{{$$d := .Dir}}{{.ImportPath}}{{range .TestGoFiles}} {{$$d}}/{{.}}{{end}}{{range .XTestGoFiles}} {{$$d}}/{{.}}{{end}}' $(PKGS)) || exit 1; \
	pkgs=$$(echo "$$listing" | while read -r pkg files; do [ -z "$$files" ] || ! grep -q '^func Fuzz' $$files || echo $$pkg; done); \
	failed=; n=0; \
	for pkg in $$pkgs; do \
		list=$$($(GO) test -list '^Fuzz' $$pkg) || { echo "$$list"; exit 1; }; \
		for fz in $$(echo "$$list" | grep '^Fuzz'); do \
			n=$$((n+1)); echo "== $$pkg $$fz ($(FUZZTIME))"; \
			out=$$($(GO) test -run '^$$' -fuzz "^$$fz\$$" -fuzztime $(FUZZTIME) $$pkg 2>&1); rc=$$?; echo "$$out"; \
			if [ $$rc -ne 0 ] && echo "$$out" | grep -q 'context deadline exceeded' && ! echo "$$out" | grep -q 'Failing input written'; then \
				echo "== $$pkg $$fz again: the fuzz coordinator timed out a busy worker at the end, no failing input"; \
				$(GO) test -run '^$$' -fuzz "^$$fz\$$" -fuzztime $(FUZZTIME) $$pkg; rc=$$?; \
			fi; \
			[ $$rc -eq 0 ] || failed="$$failed $$pkg.$$fz"; \
		done; \
	done; \
	if [ $$n -eq 0 ]; then echo "fuzz: no fuzz targets found"; exit 1; fi; \
	if [ -n "$$failed" ]; then echo "fuzz: failed:$$failed"; exit 1; fi; \
	echo "fuzz: $$n targets passed"

bench: lab build
	$(GO) test -run '^$$' -bench . -benchtime 20x ./checkpoint
	$(GO) test -run '^$$' -bench . ./txlog
	$(GO) run ./test/bench
	REMORA_LAB=1 REMORA_BENCH=1 $(GO) test -count=1 -v -run 'TestLab/WriteCost' ./checkpoint/disk/
	$(GO) run ./test/failbench -n 5
	$(MAKE) bench-kernel

bench-kernel:
	GO=$(GO) REMORA_KERNELVM_BENCH=TrackTinyGuest test/kernelvm/run.sh

demo: lab build
	test/demo.sh

STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) run $(STATICCHECK) $(PKGS)
	@# The arbiter's machine has no libvirt: everything but the agent builds without cgo.
	CGO_ENABLED=0 $(GO) build -o /dev/null ./cmd/remora
	CGO_ENABLED=0 $(GO) vet ./checkpoint/... ./arbiter/... ./txlog/... ./migrate/qemu/... ./internal/agent/api/ ./cmd/remora/

# Packaging. VERSION: a tag if there is one, else 0.0~gitDATE.REV.
VERSION ?= $(shell git describe --tags --exact-match 2>/dev/null | sed 's/^v//' || true)
ifeq ($(VERSION),)
VERSION := 0.0~git$(shell git log -1 --format=%cd --date=format:%Y%m%d 2>/dev/null).$(shell git rev-parse --short HEAD 2>/dev/null)
endif
PREFIX  ?= /usr
DESTDIR ?=
LDFLAGS := -X main.version=$(VERSION)

docs:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/remora ./cmd/remora
	rm -rf $(BIN)/docs
	$(BIN)/remora docs $(BIN)/docs

install: docs
	install -D -m 0755 $(BIN)/remora $(DESTDIR)$(PREFIX)/bin/remora
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/lib/systemd/system configs/systemd/remora-agent.service configs/systemd/remora-arbiter.service
	install -D -m 0640 configs/agent.yaml $(DESTDIR)/etc/remora/agent.yaml
	install -D -m 0640 configs/arbiter.yaml $(DESTDIR)/etc/remora/arbiter.yaml
	install -D -m 0644 configs/apparmor/remora-qemu $(DESTDIR)/etc/apparmor.d/abstractions/remora-qemu
	install -d $(DESTDIR)/etc/libvirt/hooks/qemu.d
	sed 's|@BINDIR@|$(PREFIX)/bin|' configs/libvirt/50-remora.in >$(DESTDIR)/etc/libvirt/hooks/qemu.d/50-remora
	chmod 0755 $(DESTDIR)/etc/libvirt/hooks/qemu.d/50-remora
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/remora/prometheus configs/prometheus/*
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/remora/grafana configs/grafana/*
	install -d $(DESTDIR)$(PREFIX)/share/man/man1
	for f in $(BIN)/docs/man1/*.1; do gzip -9n <$$f >$(DESTDIR)$(PREFIX)/share/man/man1/$$(basename $$f).gz; done
	install -D -m 0644 $(BIN)/docs/completion/remora.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/remora
	install -D -m 0644 $(BIN)/docs/completion/_remora $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_remora
	install -D -m 0644 $(BIN)/docs/completion/remora.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/remora.fish
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/doc/remora README.md docs/operator-guide.md

deb:
	rm -rf out/deb
	$(MAKE) install DESTDIR=$(CURDIR)/out/deb PREFIX=/usr
	test/deb/build.sh $(CURDIR)/out/deb $(CURDIR)/out $(VERSION)

deb-test: deb
	test/deb/check.sh out/remora_$(VERSION)_$$(dpkg --print-architecture).deb

clean:
	rm -rf $(BIN)
