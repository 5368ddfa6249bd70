package criproxy

import (
	"fmt"

	"google.golang.org/grpc/mem"
)

// frame is one gRPC message as it is on the wire, not decoded.
type frame struct {
	data mem.BufferSlice
}

// bytes returns the message's bytes.
func (f *frame) bytes() []byte { return f.data.Materialize() }

// free returns the frame's buffers, for a frame that is not sent on.
func (f *frame) free() { f.data.Free() }

// rawCodec passes frames through: Unmarshal keeps the received buffers
// (taking a reference, which the Marshal of the forwarded frame hands back
// to gRPC to free once sent), Marshal returns them.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	f, ok := v.(*frame)
	if !ok {
		return nil, fmt.Errorf("criproxy: cannot marshal %T", v)
	}
	data := f.data
	f.data = nil
	return data, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	f, ok := v.(*frame)
	if !ok {
		return fmt.Errorf("criproxy: cannot unmarshal into %T", v)
	}
	data.Ref()
	f.data = data
	return nil
}

// Name is the content subtype: CRI clients and containerd speak proto,
// which the frames are.
func (rawCodec) Name() string { return "proto" }
