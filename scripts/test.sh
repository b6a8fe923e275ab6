#!/usr/bin/env bash
# The one command that runs every test (README: `make test`). As root it runs
# the privileged tests too (userfaultfd, eBPF, the QEMU guest); with CI=true a
# test that cannot run here fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# Tracepoint-based eBPF needs tracefs; mount it if the machine has not.
if [ "$(id -u)" = 0 ] && [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi
go test -count=1 -timeout 25m "$@" ./...
# The packages where goroutines meet (ioctls racing Close, the notifier's
# monitor and dispatcher, the vfio-user socket, the device model), once more
# under the race detector.
# One package at a time (-p 1): five race-instrumented binaries at once on a
# 2-core machine once starved userfault's monitor thread for minutes in
# TestStress: every munmap blocked on an event the monitor did not read.
go test -count=1 -race -p 1 -timeout 15m "$@" ./driver ./userfault ./tidcache ./vfio/vfiouser ./hfisim
