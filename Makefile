# gohfi: the two commands of the README, plus helpers.
GO ?= go

.PHONY: demo test build vet fuzz bench

# The main job on the embedded device (hfisim in-process, no QEMU).
demo:
	./scripts/install-deps.sh
	$(GO) run ./tools/hfidemo

# Every test; as root also the privileged ones (CI runs this).
test:
	./scripts/test.sh

build:
	$(GO) build ./...

vet:
	$(GO) vet ./...

bench:
	$(GO) test -run '^$$' -bench . -benchtime 2000x ./vfio/vfiouser ./dma ./rcvarray
