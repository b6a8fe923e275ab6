#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian 12 machine: Go modules,
# the Debian packages (gcc for the ABI parity test, tshark for ibwire's
# wire check) and errcheck for CI. QEMU and the guest
# kernel are fetched by the QEMU harness itself (tools/vmimage) into its
# cache outside the clone. Idempotent; quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v xz >/dev/null || need+=(xz-utils)
command -v cpio >/dev/null || need+=(cpio)
command -v tshark >/dev/null || need+=(tshark) # ibwire: tshark decodes the RoCEv2 we encode
command -v ip >/dev/null || need+=(iproute2)  # test/fabric: network namespaces, veth pairs, tc
# test/rxe: the guest's RDMA WRITE/READ peer (rxe_rdma.c) is built on the host against libibverbs.
[ -e /usr/include/infiniband/verbs.h ] || need+=(libibverbs-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "install-deps: missing ${need[*]} and not root" >&2
  fi
fi
go mod download

# errcheck for .ci/run (dropped errors), at a fixed version.
errcheck_version=v1.30.0
gobin=$(go env GOBIN)
gobin=${gobin:-$(go env GOPATH)/bin}
if [ "$("$gobin/errcheck" -version 2>/dev/null)" != "errcheck $errcheck_version" ]; then
  go install "github.com/kisielk/errcheck@$errcheck_version"
fi
