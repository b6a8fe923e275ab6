//go:build 386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64 || wasm

package uapi

// hostIsLittleEndian is defined on little-endian hosts only. MarshalBytes
// and UnmarshalBytes copy the structures' memory (layout_unsafe.go), which
// is the little-endian ABI only there: on a big-endian host the package
// (and package chip, which imports it and copies its formats the same way)
// does not build, and layout_unsafe.go's use of this name says why.
const hostIsLittleEndian = true
