// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
//
// eBPF side of the userfault notifier: watch the syscalls that take memory
// away from a process (munmap, mremap, madvise, brk), its forks and its exit,
// and report those that touch a watched range through a ring buffer.
//
// Written without vmlinux.h: the classic syscall tracepoints get their
// context in the fixed layout below; the BTF programs (tp_btf, fentry) use
// CO-RE relocations against the few kernel fields they read.

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#define PAGE_SIZE 4096ULL
#define PAGE_ALIGN(x) (((x) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))

#define MAX_RANGES 8192
#define BSEARCH_STEPS 14 /* > log2(MAX_RANGES) */

/* Event kinds; the Go side mirrors them (ebpf.go). */
enum {
	EV_UNMAP = 1,
	EV_REMOVE = 2,
	EV_REMAP = 3,
	EV_FORK = 4,
	EV_EXIT = 5,
	EV_KERNEL = 6,
	EV_MARKER = 100,
};

/* Origin of an event, for the Go side's Source. */
enum {
	ORIG_SYSCALL = 0,
	ORIG_FENTRY = 1,
	ORIG_KVM = 2,
};

/* The advice value of the marker madvise: invalid, so the call does nothing. */
#define MARKER_ADVICE 0x47484649

#define MADV_DONTNEED 4
#define MADV_FREE 8
#define MADV_REMOVE 9
#define MADV_PAGEOUT 21
#define MADV_DONTNEED_LOCKED 24

#define MREMAP_MAYMOVE 1
#define MREMAP_FIXED 2
#define MREMAP_DONTUNMAP 4

struct event {
	__u64 start;
	__u64 end;
	__u64 aux; /* marker sequence, child tgid of a fork, mmu_notifier event */
	__u32 kind;
	__u32 origin;
};

struct range {
	__u64 start;
	__u64 end;
};

/* conf[0]: number of ranges, then a generation that user space makes odd
 * while it rewrites the ranges (a sequence lock; n before gen so that the
 * kernel's word-by-word copy of the value publishes n first). */
struct conf {
	__u64 n;
	__u64 gen;
};

/* Keep struct event in BTF for bpf2go's Go type. */
const struct event *unused_event __attribute__((unused));

/* Set before load. */
const volatile __u32 watch_tgid = 0;
const volatile __u32 self_tgid = 0;
const volatile __u64 marker_cookie = 0;
/* 0 when only the marker of enter_madvise is wanted (no tracepoint source). */
const volatile __u32 syscalls_on = 1;

/* Last brk of the watched process, learnt at sys_exit_brk. */
__u64 cur_brk = 0;
/* Events the ring buffer had no room for. */
__u64 lost = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_RANGES);
	__type(key, __u32);
	__type(value, struct range);
} ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct conf);
} config SEC(".maps");

/* Context of a classic sys_enter_* / sys_exit_* tracepoint. */
struct sys_enter_ctx {
	__u64 common;
	long id;
	unsigned long args[6];
};

struct sys_exit_ctx {
	__u64 common;
	long id;
	long ret;
};

static __always_inline int mine(void)
{
	return (bpf_get_current_pid_tgid() >> 32) == watch_tgid;
}

/* watched reports whether [start, end) may overlap a watched range. It errs
 * on the side of yes: user space filters again exactly. */
static __always_inline int watched(__u64 start, __u64 end)
{
	__u32 zero = 0;
	struct conf *c = bpf_map_lookup_elem(&config, &zero);
	if (!c)
		return 1;
	__u64 gen = *(volatile __u64 *)&c->gen;
	if (gen & 1)
		return 1;
	__u64 n = *(volatile __u64 *)&c->n;
	if (n > MAX_RANGES)
		n = MAX_RANGES;
	/* First range whose end is above start: ranges are sorted, disjoint. */
	__u32 lo = 0, hi = n;
	for (int i = 0; i < BSEARCH_STEPS && lo < hi; i++) {
		__u32 mid = lo + (hi - lo) / 2;
		struct range *r = bpf_map_lookup_elem(&ranges, &mid);
		if (!r)
			return 1;
		if (r->end > start)
			hi = mid;
		else
			lo = mid + 1;
	}
	int hit = 0;
	if (lo < n) {
		struct range *r = bpf_map_lookup_elem(&ranges, &lo);
		if (!r || r->start < end)
			hit = 1;
	}
	if (*(volatile __u64 *)&c->gen != gen)
		return 1;
	return hit;
}

static __always_inline void emit(__u32 kind, __u32 origin, __u64 start, __u64 end, __u64 aux)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&lost, 1);
		return;
	}
	e->start = start;
	e->end = end;
	e->aux = aux;
	e->kind = kind;
	e->origin = origin;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void report(__u32 kind, __u64 start, __u64 end)
{
	if (end > start && watched(start, end))
		emit(kind, ORIG_SYSCALL, start, end, 0);
}

SEC("tracepoint/syscalls/sys_enter_munmap")
int enter_munmap(struct sys_enter_ctx *ctx)
{
	if (!mine())
		return 0;
	__u64 start = ctx->args[0];
	report(EV_UNMAP, start, start + PAGE_ALIGN(ctx->args[1]));
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_mremap")
int enter_mremap(struct sys_enter_ctx *ctx)
{
	if (!mine())
		return 0;
	__u64 addr = ctx->args[0];
	__u64 old_len = PAGE_ALIGN(ctx->args[1]);
	__u64 new_len = PAGE_ALIGN(ctx->args[2]);
	__u64 flags = ctx->args[3];
	__u64 new_addr = ctx->args[4];

	/* At entry the outcome is unknown: report what may happen. */
	if (flags & (MREMAP_FIXED | MREMAP_DONTUNMAP)) {
		report(EV_REMAP, addr, addr + old_len);
		if (flags & MREMAP_FIXED)
			report(EV_UNMAP, new_addr, new_addr + new_len);
	} else if (new_len < old_len) {
		report(EV_UNMAP, addr + new_len, addr + old_len);
	} else if (new_len > old_len && (flags & MREMAP_MAYMOVE)) {
		report(EV_REMAP, addr, addr + old_len);
	}
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_madvise")
int enter_madvise(struct sys_enter_ctx *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 advice = ctx->args[2];
	if (advice == MARKER_ADVICE && ctx->args[0] == marker_cookie && (id >> 32) == self_tgid) {
		emit(EV_MARKER, ORIG_SYSCALL, 0, 0, ctx->args[1]);
		return 0;
	}
	if (!syscalls_on || (id >> 32) != watch_tgid)
		return 0;
	switch (advice) {
	case MADV_DONTNEED:
	case MADV_FREE:
	case MADV_REMOVE:
	case MADV_PAGEOUT:
	case MADV_DONTNEED_LOCKED: {
		__u64 start = ctx->args[0];
		report(EV_REMOVE, start, start + PAGE_ALIGN(ctx->args[1]));
		break;
	}
	}
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_brk")
int enter_brk(struct sys_enter_ctx *ctx)
{
	if (!mine())
		return 0;
	__u64 nb = ctx->args[0];
	__u64 old = cur_brk;
	/* brk(0) and growth change nothing; an unknown old brk (0) cannot be
	 * judged, and user space learns it with a brk(0) when it starts. */
	if (nb == 0 || old == 0 || nb >= old)
		return 0;
	report(EV_UNMAP, PAGE_ALIGN(nb), PAGE_ALIGN(old));
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_brk")
int exit_brk(struct sys_exit_ctx *ctx)
{
	if (!mine())
		return 0;
	if (ctx->ret > 0)
		cur_brk = ctx->ret;
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int process_exit(void *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	/* The thread group leader's exit stands for the process's. */
	if ((id >> 32) != watch_tgid || (__u32)id != watch_tgid)
		return 0;
	emit(EV_EXIT, ORIG_SYSCALL, 0, ~0ULL, 0);
	return 0;
}

struct mm_struct {
	int __unused;
} __attribute__((preserve_access_index));

struct task_struct {
	struct mm_struct *mm;
	int tgid;
} __attribute__((preserve_access_index));

/* A fork copies the address space and makes private pages copy-on-write in
 * the parent. Threads and vfork share the mm and are skipped. */
SEC("tp_btf/sched_process_fork")
int process_fork(__u64 *ctx)
{
	struct task_struct *parent = (struct task_struct *)ctx[0];
	struct task_struct *child = (struct task_struct *)ctx[1];
	if (parent->tgid != watch_tgid)
		return 0;
	if (child->mm == parent->mm)
		return 0;
	emit(EV_FORK, ORIG_SYSCALL, 0, ~0ULL, child->tgid);
	return 0;
}

/* The KVM mmu notifier's tracepoint: fires for every invalidation of the mm
 * of a process that holds a KVM VM, whatever the cause (unmap, migration,
 * THP split, COW, mprotect, reclaim). It runs in whatever context invalidates
 * (kcompactd, khugepaged, ...), so only the range can filter. */
SEC("tp_btf/kvm_unmap_hva_range")
int kvm_unmap_hva_range(__u64 *ctx)
{
	__u64 start = ctx[0], end = ctx[1];
	if (end > start && watched(start, end))
		emit(EV_KERNEL, ORIG_KVM, start, end, 0);
	return 0;
}

struct mmu_notifier_range {
	struct mm_struct *mm;
	unsigned long start;
	unsigned long end;
	int event;
} __attribute__((preserve_access_index));

/* The kernel's own notifier entry point (called when the mm has notifiers,
 * which the KVM source arranges). Kernels in lockdown refuse fentry. */
SEC("fentry/__mmu_notifier_invalidate_range_start")
int mmu_invalidate_start(__u64 *ctx)
{
	struct mmu_notifier_range *r = (struct mmu_notifier_range *)ctx[0];
	__u64 start = r->start, end = r->end;
	if (end > start && watched(start, end))
		emit(EV_KERNEL, ORIG_FENTRY, start, end, r->event);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
