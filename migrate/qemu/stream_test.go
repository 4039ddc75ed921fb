package qemu

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// streamBuilder writes a migration stream as QEMU 7.2 does
// (migration/savevm.c, migration/ram.c) with x-ignore-shared on.
type streamBuilder struct{ bytes.Buffer }

func (b *streamBuilder) u8(v byte)    { b.WriteByte(v) }
func (b *streamBuilder) u32(v uint32) { b.Write(binary.BigEndian.AppendUint32(nil, v)) }
func (b *streamBuilder) u64(v uint64) { b.Write(binary.BigEndian.AppendUint64(nil, v)) }
func (b *streamBuilder) name(s string) {
	b.u8(byte(len(s)))
	b.WriteString(s)
}

func (b *streamBuilder) header() {
	b.u32(streamMagic)
	b.u32(streamVersion)
	b.u8(vmConfiguration)
	b.u32(13)
	b.WriteString("pc-i440fx-7.2")
	b.u8(vmSubsection)
	b.name("configuration/capabilities")
	b.u32(1)
	b.u32(1)
	b.name("x-ignore-shared")
}

func (b *streamBuilder) section(typ byte, id uint32, idstr string) {
	b.u8(typ)
	b.u32(id)
	if typ == vmSectionStart || typ == vmSectionFull {
		b.name(idstr)
		b.u32(0)
		b.u32(4)
	}
}

func (b *streamBuilder) footer(id uint32) {
	b.u8(vmSectionFooter)
	b.u32(id)
}

// lab guest's layout: RAM in a shared file (ignored) and two ROMs.
func (b *streamBuilder) ramSetup() {
	b.section(vmSectionStart, 3, "ram")
	blocks := []struct {
		id   string
		size uint64
	}{{"pc.ram", 256 << 20}, {"pc.bios", 256 << 10}, {"/rom@etc/acpi/tables", 128 << 10}}
	var total uint64
	for _, bl := range blocks {
		total += bl.size
	}
	b.u64(total | ramFlagMemSize)
	for _, bl := range blocks {
		b.name(bl.id)
		b.u64(bl.size)
		b.u64(0)
	}
	b.u64(ramFlagEOS)
	b.footer(3)
}

func (b *streamBuilder) ramPages(typ byte) {
	b.section(typ, 3, "")
	b.u64(0 | ramFlagPage)
	b.name("pc.bios")
	b.Write(bytes.Repeat([]byte{0xab}, targetPageSize))
	b.u64(targetPageSize | ramFlagZero | ramFlagContinue)
	b.u8(0)
	b.u64(0 | ramFlagPage)
	b.name("/rom@etc/acpi/tables")
	b.Write(bytes.Repeat([]byte{0xcd}, targetPageSize))
	b.u64(ramFlagEOS)
	b.footer(3)
}

func (b *streamBuilder) devices() {
	b.section(vmSectionFull, 4, "timer")
	b.Write([]byte{vmSectionEnd, vmEOF, 1, 2, 3, 4}) // device bytes are opaque
	b.footer(4)
	b.u8(vmEOF)
	desc := `{"page_size":4096,"devices":[{"name":"timer","instance_id":0}]}`
	b.u8(vmDescription)
	b.u32(uint32(len(desc)))
	b.WriteString(desc)
}

// completeStream is a whole save; stopAt is where the guest was stopped.
func completeStream() (stream []byte, stopAt int) {
	var b streamBuilder
	b.header()
	b.u8(vmCommand) // a command on the way is skipped
	b.Write([]byte{0, 1, 0, 2, 9, 9})
	b.ramSetup()
	b.ramPages(vmSectionPart)
	stopAt = b.Len()
	b.ramPages(vmSectionEnd)
	b.devices()
	return b.Bytes(), stopAt
}

func follow(stream []byte) (int64, error) {
	f := &streamFollower{r: bufio.NewReader(bytes.NewReader(stream))}
	if err := f.header(); err != nil {
		return f.off, err
	}
	err := f.untilStopped()
	return f.off, err
}

func TestStreamFollowerSeesTheStop(t *testing.T) {
	stream, stopAt := completeStream()
	off, err := follow(stream)
	if err != nil {
		t.Fatal(err)
	}
	if off != int64(stopAt) {
		t.Fatalf("stopped at byte %d, QEMU stopped the guest before byte %d", off, stopAt)
	}
	if !completeTail(stream) {
		t.Fatal("a complete stream is not recognised as complete")
	}
}

func TestStreamFollowerRefuses(t *testing.T) {
	stream, stopAt := completeStream()
	for name, bad := range map[string][]byte{
		"truncated before the stop": stream[:stopAt-10],
		"not a migration stream":    []byte("GET / HTTP/1.1\r\n\r\n"),
		"page of an unknown block": func() []byte {
			s := bytes.Clone(stream)
			first := bytes.Index(s, []byte("pc.bios")) // the block list's
			i := first + 1 + bytes.Index(s[first+1:], []byte("pc.bios"))
			copy(s[i:], "pc.xxxx") // the first page record's
			return s
		}(),
		"xbzrle page": func() []byte {
			s := bytes.Clone(stream)
			// the first page record after the setup section
			i := bytes.Index(s, append([]byte{0, 0, 0, 0, 0, 0, 0, ramFlagPage, 7}, "pc.bios"...))
			s[i+7] = 0x40
			return s
		}(),
		"unknown live section": bytes.Replace(stream, []byte("\x03ram"), []byte("\x03blk"), 1),
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := follow(bad); !errors.Is(err, ErrStreamFormat) {
				t.Fatalf("err %v, want ErrStreamFormat", err)
			}
		})
	}
	// The stream's end proves completion; a cut one does not.
	for _, cut := range []int{1, 10, 40, len(stream) - stopAt} {
		if completeTail(stream[:len(stream)-cut]) {
			t.Errorf("stream cut by %d bytes taken for complete", cut)
		}
	}
}

// A page past the end of its block is refused (the follower checks every
// record it skips against the block list).
func TestStreamFollowerChecksPageOffsets(t *testing.T) {
	stream, _ := completeStream()
	rec := binary.BigEndian.AppendUint64(nil, targetPageSize|ramFlagZero|ramFlagContinue)
	bad := binary.BigEndian.AppendUint64(nil, 512<<10|ramFlagZero|ramFlagContinue)
	_, err := follow(bytes.Replace(stream, rec, bad, 1))
	if !errors.Is(err, ErrStreamFormat) || !strings.Contains(err.Error(), "past the end") {
		t.Fatalf("err %v", err)
	}
}

func FuzzStreamFollower(f *testing.F) {
	stream, stopAt := completeStream()
	f.Add(stream)
	f.Add(stream[:stopAt])
	f.Fuzz(func(t *testing.T, b []byte) {
		off, err := follow(b)
		if err == nil && (off >= int64(len(b)) || (b[off] != vmSectionEnd && b[off] != vmSectionFull)) {
			t.Fatalf("stop reported at byte %d, which is no END or FULL section", off)
		}
		_ = completeTail(b)
	})
}
