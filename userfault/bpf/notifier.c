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

struct bsearch {
	__u64 start;
	__u32 lo;
	__u32 hi;
	int fail;
};

/* One step of the binary search, run by bpf_loop: the verifier checks the
 * callback once instead of every path through an unrolled search (which
 * took it most of a second per program). */
static long bsearch_step(__u32 i, void *arg)
{
	struct bsearch *b = arg;
	if (b->lo >= b->hi)
		return 1;
	__u32 mid = b->lo + (b->hi - b->lo) / 2;
	struct range *r = bpf_map_lookup_elem(&ranges, &mid);
	if (!r) {
		b->fail = 1;
		return 1;
	}
	if (r->end > b->start)
		b->hi = mid;
	else
		b->lo = mid + 1;
	return 0;
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
	struct bsearch b = {.start = start, .lo = 0, .hi = n};
	bpf_loop(BSEARCH_STEPS, bsearch_step, &b, 0);
	if (b.fail)
		return 1;
	int hit = 0;
	if (b.lo < n) {
		__u32 lo = b.lo;
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

/*
 * The syscalls are reported at their exit, once they succeeded: at entry the
 * memory is still there (a consumer told then could re-validate it before
 * the kernel takes it away), and a failed call takes nothing. The entry
 * programs keep the arguments per thread until the exit.
 */
enum {
	SC_MUNMAP = 1,
	SC_MREMAP = 2,
	SC_MADVISE = 3,
};

struct call {
	__u64 args[5];
	__u32 sc;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct call);
} calls SEC(".maps");

/* The context of a syscall tracepoint holds only that syscall's arguments:
 * reading past them makes the kernel refuse to attach (EACCES). */
static __always_inline void remember(__u32 sc, __u64 a0, __u64 a1, __u64 a2, __u64 a3, __u64 a4)
{
	struct call c = {};
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	c.sc = sc;
	c.args[0] = a0;
	c.args[1] = a1;
	c.args[2] = a2;
	c.args[3] = a3;
	c.args[4] = a4;
	bpf_map_update_elem(&calls, &tid, &c, BPF_ANY);
}

/* recall returns the arguments of this thread's pending call if it was sc
 * and succeeded, and forgets them. */
static __always_inline int recall(struct sys_exit_ctx *ctx, __u32 sc, struct call *out)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct call *c = bpf_map_lookup_elem(&calls, &tid);
	if (!c)
		return 0;
	/* Errors are -4095..-1; user addresses (mremap's result) are positive. */
	int ok = c->sc == sc && ctx->ret >= 0;
	if (ok)
		__builtin_memcpy(out, c, sizeof(*out));
	bpf_map_delete_elem(&calls, &tid);
	return ok;
}

SEC("tracepoint/syscalls/sys_enter_munmap")
int enter_munmap(struct sys_enter_ctx *ctx)
{
	if (!syscalls_on || !mine())
		return 0;
	__u64 start = ctx->args[0], end = start + PAGE_ALIGN(ctx->args[1]);
	if (end > start && watched(start, end))
		remember(SC_MUNMAP, start, ctx->args[1], 0, 0, 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_munmap")
int exit_munmap(struct sys_exit_ctx *ctx)
{
	struct call c;
	if (!syscalls_on || !mine() || !recall(ctx, SC_MUNMAP, &c))
		return 0;
	emit(EV_UNMAP, ORIG_SYSCALL, c.args[0], c.args[0] + PAGE_ALIGN(c.args[1]), 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_mremap")
int enter_mremap(struct sys_enter_ctx *ctx)
{
	if (!syscalls_on || !mine())
		return 0;
	__u64 addr = ctx->args[0], old_len = PAGE_ALIGN(ctx->args[1]);
	__u64 new_len = PAGE_ALIGN(ctx->args[2]), flags = ctx->args[3], new_addr = ctx->args[4];
	if (watched(addr, addr + old_len) ||
	    ((flags & MREMAP_FIXED) && watched(new_addr, new_addr + new_len)))
		remember(SC_MREMAP, addr, ctx->args[1], ctx->args[2], flags, new_addr);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_mremap")
int exit_mremap(struct sys_exit_ctx *ctx)
{
	struct call c;
	if (!syscalls_on || !mine() || !recall(ctx, SC_MREMAP, &c))
		return 0;
	__u64 addr = c.args[0], old_len = PAGE_ALIGN(c.args[1]);
	__u64 new_len = PAGE_ALIGN(c.args[2]), flags = c.args[3];
	__u64 to = (__u64)ctx->ret;
	if (to != addr) {
		/* Moved: the old range is gone, its pages live at to. */
		if (watched(addr, addr + old_len))
			emit(EV_REMAP, ORIG_SYSCALL, addr, addr + old_len, to);
		/* MREMAP_FIXED unmapped whatever was at the destination. */
		if (flags & MREMAP_FIXED)
			report(EV_UNMAP, to, to + new_len);
	} else if (new_len < old_len) {
		report(EV_UNMAP, addr + new_len, addr + old_len);
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
		__u64 start = ctx->args[0], end = start + PAGE_ALIGN(ctx->args[1]);
		if (end > start && watched(start, end))
			remember(SC_MADVISE, start, ctx->args[1], advice, 0, 0);
		break;
	}
	}
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_madvise")
int exit_madvise(struct sys_exit_ctx *ctx)
{
	struct call c;
	if (!syscalls_on || !mine() || !recall(ctx, SC_MADVISE, &c))
		return 0;
	emit(EV_REMOVE, ORIG_SYSCALL, c.args[0], c.args[0] + PAGE_ALIGN(c.args[1]), 0);
	return 0;
}

/* brk returns the new break; the old one is the last seen. A shrink unmaps
 * the pages between them. User space teaches the first value with brk(0). */
SEC("tracepoint/syscalls/sys_exit_brk")
int exit_brk(struct sys_exit_ctx *ctx)
{
	if (!syscalls_on || !mine() || ctx->ret <= 0)
		return 0;
	__u64 nb = ctx->ret, old = cur_brk;
	cur_brk = nb;
	if (old != 0 && nb < old)
		report(EV_UNMAP, PAGE_ALIGN(nb), PAGE_ALIGN(old));
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

/* The same with BTF (Linux 6.x passes group_dead): the last thread's exit is
 * the process's. Preferred; the classic tracepoint is the fallback. */
SEC("tp_btf/sched_process_exit")
int process_exit_btf(__u64 *ctx)
{
	struct task_struct *p = (struct task_struct *)ctx[0];
	int group_dead = (int)ctx[1];
	if (p->tgid != watch_tgid || !group_dead)
		return 0;
	emit(EV_EXIT, ORIG_SYSCALL, 0, ~0ULL, 0);
	return 0;
}

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
	/* Kernel threads (kcompactd, khugepaged, ksmd, kswapd) have no mm and
	 * may work on ours; another process working on its own memory (with its
	 * own VM) is not about us. */
	struct task_struct *cur = bpf_get_current_task_btf();
	if (cur->mm && cur->tgid != watch_tgid)
		return 0;
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
	/* As for the KVM tracepoint: kernel threads may work on our memory;
	 * other processes with an mm are working on their own. */
	struct task_struct *cur = bpf_get_current_task_btf();
	if (cur->mm && cur->tgid != watch_tgid)
		return 0;
	if (end > start && watched(start, end))
		emit(EV_KERNEL, ORIG_FENTRY, start, end, r->event);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
