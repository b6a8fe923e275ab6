package userfault

// The eBPF programs are committed compiled (notifier_bpfel.o and its Go
// loader), so building needs no clang. To rebuild them:
//
//	apt-get install clang llvm libbpf-dev linux-libc-dev
//	go generate ./userfault
//
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -target bpfel -type event -type range -type conf notifier bpf/notifier.c -- -O2 -g -Wall -I/usr/include/x86_64-linux-gnu
