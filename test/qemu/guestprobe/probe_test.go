//go:build gohfiguest

package guestprobe

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/gohfi/gohfi/vfio/abi"
	"github.com/gohfi/gohfi/vfio/kernel"
)

func inGuest(t *testing.T) {
	t.Helper()
	if os.Getenv("GOHFI_GUEST") != "1" {
		t.Skip("runs only inside the gohfi QEMU guest (GOHFI_GUEST=1)")
	}
}

func fact(key string, value any) {
	fmt.Printf("GOHFI-FACT %s=%v\n", key, value)
}

func result(err error) string {
	if err == nil {
		return "ok"
	}
	return "error: " + err.Error()
}

func TestKernel(t *testing.T) {
	inGuest(t)
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatal(err)
	}
	fact("kernel", unix.ByteSliceToString(uts.Release[:]))
	b, _ := os.ReadFile("/proc/uptime")
	fact("uptime", string(b[:len(b)-1]))
	_, err := os.Stat("/sys/kernel/security/lockdown")
	lock, _ := os.ReadFile("/sys/kernel/security/lockdown")
	if err == nil && len(lock) > 0 {
		fact("lockdown", string(lock[:len(lock)-1]))
	}
}

func TestUserfaultfd(t *testing.T) {
	inGuest(t)
	features, err := uffdProbe()
	fact("userfaultfd", result(err))
	if err != nil {
		t.Fatal(err)
	}
	fact("userfaultfd_features", fmt.Sprintf("%#x", features))
	err = uffdRegisterWP()
	fact("userfaultfd_register_missing_wp", result(err))
	if err != nil {
		t.Error(err)
	}
}

func TestTracefs(t *testing.T) {
	inGuest(t)
	_, err := os.Stat("/sys/kernel/tracing/events/syscalls/sys_enter_munmap/id")
	fact("tracefs_syscall_events", result(err))
	if err != nil {
		t.Fatal(err)
	}
}

// TestBPFTracepoint loads a syscall tracepoint program that counts
// munmap calls into an array map, attaches it and checks that it fires.
func TestBPFTracepoint(t *testing.T) {
	inGuest(t)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		fact("bpf_map", result(err))
		t.Fatal(err)
	}
	defer m.Close()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.TracePoint,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "exit"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, 0).WithSymbol("exit"),
			asm.Return(),
		},
	})
	fact("bpf_prog_load_tracepoint", result(err))
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	l, err := link.Tracepoint("syscalls", "sys_enter_munmap", prog, nil)
	fact("bpf_attach_tracepoint", result(err))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for range 3 {
		b, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Munmap(b); err != nil {
			t.Fatal(err)
		}
	}
	var n uint64
	if err := m.Lookup(uint32(0), &n); err != nil {
		t.Fatal(err)
	}
	fact("bpf_tracepoint_munmap_count", n)
	if n < 3 {
		t.Fatalf("tracepoint counted %d munmaps, want at least 3", n)
	}
}

// TestBPFOther reports (without failing) what else the guest allows: tp_btf,
// fentry and ring buffers, which the host's lockdown partly forbids.
func TestBPFOther(t *testing.T) {
	inGuest(t)
	ret0 := asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}
	try := func(name string, spec *ebpf.ProgramSpec, attach func(*ebpf.Program) (link.Link, error)) {
		prog, err := ebpf.NewProgram(spec)
		if err == nil {
			var l link.Link
			l, err = attach(prog)
			if err == nil {
				l.Close()
			}
			prog.Close()
		}
		fact(name, result(err))
	}
	try("bpf_tp_btf_sys_enter", &ebpf.ProgramSpec{
		Type: ebpf.Tracing, AttachType: ebpf.AttachTraceRawTp, AttachTo: "sys_enter",
		License: "GPL", Instructions: ret0,
	}, func(p *ebpf.Program) (link.Link, error) { return link.AttachTracing(link.TracingOptions{Program: p}) })
	try("bpf_fentry_munmap", &ebpf.ProgramSpec{
		Type: ebpf.Tracing, AttachType: ebpf.AttachTraceFEntry, AttachTo: "__x64_sys_munmap",
		License: "GPL", Instructions: ret0,
	}, func(p *ebpf.Program) (link.Link, error) { return link.AttachTracing(link.TracingOptions{Program: p}) })
	rb, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.RingBuf, MaxEntries: 1 << 16})
	if err == nil {
		rb.Close()
	}
	fact("bpf_ringbuf", result(err))
}

// TestVFIOContainer checks that the VFIO modules loaded by the init give a
// working container with the type1 v2 IOMMU.
func TestVFIOContainer(t *testing.T) {
	inGuest(t)
	c, err := kernel.OpenContainer("/dev/vfio/vfio")
	fact("vfio_container", result(err))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v, err := c.APIVersion()
	if err != nil || v != abi.VFIO_API_VERSION {
		t.Fatalf("API version %d, %v", v, err)
	}
	for _, e := range []struct {
		name string
		ext  int
	}{{"type1v2", abi.VFIO_TYPE1v2_IOMMU}, {"unmap_all", abi.VFIO_UNMAP_ALL}, {"noiommu", abi.VFIO_NOIOMMU_IOMMU}} {
		ok, err := c.CheckExtension(e.ext)
		if err != nil {
			t.Fatal(err)
		}
		fact("vfio_ext_"+e.name, ok)
		if e.ext == abi.VFIO_TYPE1v2_IOMMU && !ok {
			t.Error("no type1 v2 IOMMU")
		}
	}
	ents, err := os.ReadDir("/sys/class/iommu")
	if err != nil || len(ents) == 0 {
		t.Errorf("no IOMMU in /sys/class/iommu (%v): intel_iommu=on not effective", err)
	} else {
		fact("iommu", ents[0].Name())
	}
	// /dev/vfio/vfio must not be the only way in: iommufd would be
	// /dev/iommu, which this kernel lacks.
	_, err = os.Stat("/dev/iommu")
	fact("iommufd", !errors.Is(err, os.ErrNotExist))
}
