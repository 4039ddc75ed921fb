package outcommit

import (
	"encoding/binary"
	"fmt"
)

// The stream format of QEMU's filter-redirector (and filter-mirror) on a
// chardev: per frame a be32 length, then, when the filter has
// vnet_hdr_support, a be32 virtio-net header length, then length bytes of
// frame (which start with that many bytes of virtio-net header when the NIC
// uses one). The release filter reads the same format, so held records are
// written back to QEMU byte for byte as they came.

// MaxFrameLen is the largest frame QEMU passes through a filter (its
// NET_BUFSIZE, 4096 + 65536). The release filter stops reading its chardev
// for good on a longer one, so longer records are refused as corruption.
const MaxFrameLen = 4096 + 65536

// record is one frame as it travels on the chardev: header and payload.
type record struct {
	raw   []byte // header + frame, as read
	hdr   int    // header length in raw (4 or 8)
	vnet  int    // virtio-net header length at the start of the frame (0 without vnet_hdr_support)
	start int64  // stream offset of the record's first byte
}

// End is the stream offset just after the record.
func (r record) end() int64 { return r.start + int64(len(r.raw)) }

// Frame is the frame (virtio-net header included, when there is one).
func (r record) frame() []byte { return r.raw[r.hdr:] }

// Ethernet is the Ethernet frame without the virtio-net header.
func (r record) ethernet() []byte { return r.raw[r.hdr+r.vnet:] }

// parser splits the chardev stream into records. Feed it the bytes in the
// order they were read; it keeps a partial record across calls.
type parser struct {
	vnetHdr bool
	off     int64  // stream offset of the next byte fed
	partial []byte // bytes of the record being assembled
	start   int64  // its stream offset
}

func (p *parser) hdrLen() int {
	if p.vnetHdr {
		return 8
	}
	return 4
}

// feed parses b and calls emit for every complete record, in stream order.
// The records own their bytes. An error means the stream is corrupt
// (out of sync): nothing after it can be trusted.
func (p *parser) feed(b []byte, emit func(record)) error {
	h := p.hdrLen()
	for len(b) > 0 {
		if len(p.partial) == 0 {
			p.start = p.off
		}
		// Header first.
		if len(p.partial) < h {
			n := min(h-len(p.partial), len(b))
			p.partial = append(p.partial, b[:n]...)
			b = b[n:]
			p.off += int64(n)
			if len(p.partial) < h {
				return nil
			}
			flen := binary.BigEndian.Uint32(p.partial[0:4])
			if flen > MaxFrameLen {
				return fmt.Errorf("outcommit: corrupt capture stream at offset %d: frame length %d (max %d)", p.start, flen, MaxFrameLen)
			}
			if p.vnetHdr {
				if v := binary.BigEndian.Uint32(p.partial[4:8]); v > flen && flen > 0 {
					return fmt.Errorf("outcommit: corrupt capture stream at offset %d: vnet header length %d > frame length %d", p.start, v, flen)
				}
			}
			// Allocate the record once, at its final size.
			raw := make([]byte, h, h+int(flen))
			copy(raw, p.partial)
			p.partial = raw
		}
		flen := int(binary.BigEndian.Uint32(p.partial[0:4]))
		need := h + flen - len(p.partial)
		n := min(need, len(b))
		p.partial = append(p.partial, b[:n]...)
		b = b[n:]
		p.off += int64(n)
		if len(p.partial) < h+flen {
			return nil
		}
		r := record{raw: p.partial, hdr: h, start: p.start}
		if p.vnetHdr {
			r.vnet = int(binary.BigEndian.Uint32(p.partial[4:8]))
		}
		p.partial = nil
		if flen == 0 {
			continue // QEMU never sends one; nothing to pass on
		}
		emit(r)
	}
	return nil
}

// appendRecord appends a record for frame in the chardev format.
func appendRecord(b []byte, frame []byte, vnetHdr bool, vnetLen int) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(frame)))
	if vnetHdr {
		b = binary.BigEndian.AppendUint32(b, uint32(vnetLen))
	}
	return append(b, frame...)
}
