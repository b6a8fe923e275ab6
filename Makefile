# gohfi: the two commands of the README, plus helpers.
GO ?= go

.PHONY: demo test build vet fuzz bench vm

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
	$(GO) test -run '^$$' -bench . -benchtime 2000x ./vfio/vfiouser ./dma ./rcvarray ./ibwire

# Boot the QEMU guest interactively with an hfisim device (guest PCI
# 0000:00:04.0) and hfictl in /bin: hfictl --device pci:0000:00:04.0 info.
# Ctrl-A X quits QEMU; 'exit' in the guest powers off. See docs/qemu.md.
vm:
	$(GO) run ./tools/vmimage vm -hfisim -tool ./tools/hfictl
