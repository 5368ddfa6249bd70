package fs

import (
	"encoding/binary"
	"syscall"
	"testing"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// A GETXATTR with a short name is shorter than a READ: its reply still
// gets the room the kernel asks for (a 64 KiB buffer once hung a
// getxattr, the reply not fitting the buffer and never sent).
func TestPayloadSize(t *testing.T) {
	getxattr := func(size uint32, name string) []byte {
		in := fuse.GetXAttrIn{Size: size}
		in.InHeader.Opcode = opGetxattr
		b := unsafe.Slice((*byte)(unsafe.Pointer(&in)), unsafe.Sizeof(in))
		return append(append([]byte(nil), b...), name+"\x00"...)
	}
	read := func(size uint32) []byte {
		in := fuse.ReadIn{Size: size}
		in.InHeader.Opcode = opRead
		return append([]byte(nil), unsafe.Slice((*byte)(unsafe.Pointer(&in)), unsafe.Sizeof(in))...)
	}
	for _, tc := range []struct {
		name string
		req  []byte
		want int
	}{
		{"getxattr, short name", getxattr(65536, "user.a"), 65536},
		{"getxattr, size probe", getxattr(0, "security.sl"), 0},
		{"read", read(131072), 131072},
		{"truncated read", read(4096)[:inHeaderSize+4], 0},
		{"header only", make([]byte, inHeaderSize), 0},
	} {
		if got := payloadSize(tc.req); got != tc.want {
			t.Errorf("%s: payloadSize %d, want %d", tc.name, got, tc.want)
		}
	}
}

// A request the server cannot answer gets its error, with its unique.
func TestErrorReply(t *testing.T) {
	req := make([]byte, inHeaderSize)
	binary.NativeEndian.PutUint64(req[8:16], 0x1234)
	out := make([]byte, 64)
	n := errorReply(req, fuse.Status(syscall.EIO), out)
	if n != outHeaderSize || binary.NativeEndian.Uint32(out[0:4]) != outHeaderSize ||
		int32(binary.NativeEndian.Uint32(out[4:8])) != -int32(syscall.EIO) || binary.NativeEndian.Uint64(out[8:16]) != 0x1234 {
		t.Errorf("error reply %x (%d bytes)", out[:16], n)
	}
	if errorReply(req[:10], fuse.EIO, out) != 0 {
		t.Error("a reply to a truncated request")
	}
}
