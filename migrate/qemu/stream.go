package qemu

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// The parts of QEMU's migration stream format (QEMU 7.2, migration/savevm.c
// and migration/ram.c) that the agent follows while a device-state save
// arrives: enough to see the moment QEMU stopped the guest (the first
// iterable section's END: it is written only after vm_stop) and to tell a
// complete stream from a truncated one. Device sections are not parsed;
// they come after the stop and are kept as they are.
const (
	streamMagic   = 0x5145564d // "QEVM"
	streamVersion = 3

	vmEOF           = 0x00
	vmSectionStart  = 0x01
	vmSectionPart   = 0x02
	vmSectionEnd    = 0x03
	vmSectionFull   = 0x04
	vmSubsection    = 0x05
	vmDescription   = 0x06
	vmConfiguration = 0x07
	vmCommand       = 0x08
	vmSectionFooter = 0x7e

	ramFlagZero     = 0x02
	ramFlagMemSize  = 0x04
	ramFlagPage     = 0x08
	ramFlagEOS      = 0x10
	ramFlagContinue = 0x20
	ramFlagsKnown   = ramFlagZero | ramFlagMemSize | ramFlagPage | ramFlagEOS | ramFlagContinue

	targetPageSize = 4096
	// maxStreamName bounds names read from the stream (machine type,
	// section and RAM block ids are short).
	maxStreamName = 1 << 12
	// maxDescription bounds the JSON device description at a stream's end.
	maxDescription = 4 << 20
)

// ErrStreamFormat marks a migration stream the agent does not understand:
// corrupt, truncated, or from a QEMU configuration it does not support
// (compression, xbzrle, multifd, postcopy).
var ErrStreamFormat = errors.New("unexpected QEMU migration stream")

func streamErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrStreamFormat, fmt.Sprintf(format, args...))
}

// streamFollower reads a migration stream section by section until the
// guest is stopped.
type streamFollower struct {
	r            *bufio.Reader
	off          int64
	ignoreShared bool
	ramSection   uint32 // section id of "ram", once its START was seen
	haveRAM      bool
	ramBlocks    map[string]uint64 // RAM block id -> length
	lastBlock    string
	// lastLive is when the data of the last live section (START or PART)
	// arrived: QEMU stops the guest after it, so the pause began no
	// earlier.
	lastLive time.Time
}

func (f *streamFollower) read(n int) ([]byte, error) {
	b := make([]byte, n)
	if _, err := io.ReadFull(f.r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("%w at byte %d: %v", ErrStreamFormat, f.off, err)
	}
	f.off += int64(n)
	return b, nil
}

func (f *streamFollower) skip(n int64) error {
	m, err := io.CopyN(io.Discard, f.r, n)
	f.off += m
	if err != nil {
		return fmt.Errorf("%w at byte %d: truncated (%v)", ErrStreamFormat, f.off, err)
	}
	return nil
}

func (f *streamFollower) u8() (byte, error) {
	b, err := f.read(1)
	if err != nil {
		return 0, err
	}
	return b[0], nil
}

func (f *streamFollower) u16() (uint16, error) {
	b, err := f.read(2)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint16(b), nil
}

func (f *streamFollower) u32() (uint32, error) {
	b, err := f.read(4)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(b), nil
}

func (f *streamFollower) u64() (uint64, error) {
	b, err := f.read(8)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(b), nil
}

// name reads a string of a one-byte length.
func (f *streamFollower) name() (string, error) {
	n, err := f.u8()
	if err != nil {
		return "", err
	}
	b, err := f.read(int(n))
	return string(b), err
}

// header reads the magic, the version and the configuration section.
func (f *streamFollower) header() error {
	magic, err := f.u32()
	if err != nil {
		return err
	}
	version, err := f.u32()
	if err != nil {
		return err
	}
	if magic != streamMagic || version != streamVersion {
		return streamErr("header %08x version %d, want %08x version %d", magic, version, streamMagic, streamVersion)
	}
	if t, err := f.r.Peek(1); err != nil || t[0] != vmConfiguration {
		return nil // no configuration section (send-configuration=off)
	}
	_, _ = f.u8()
	n, err := f.u32()
	if err != nil {
		return err
	}
	if n > maxStreamName {
		return streamErr("machine type name of %d bytes", n)
	}
	if _, err := f.read(int(n)); err != nil {
		return err
	}
	for {
		t, err := f.r.Peek(1)
		if err != nil || t[0] != vmSubsection {
			return nil
		}
		_, _ = f.u8()
		id, err := f.name()
		if err != nil {
			return err
		}
		if _, err := f.u32(); err != nil { // version
			return err
		}
		switch id {
		case "configuration/target-page-bits":
			bits, err := f.u32()
			if err != nil {
				return err
			}
			if 1<<bits != targetPageSize {
				return streamErr("target page size 2^%d, want %d", bits, targetPageSize)
			}
		case "configuration/capabilities":
			count, err := f.u32()
			if err != nil {
				return err
			}
			if count > 64 {
				return streamErr("%d capabilities in the configuration section", count)
			}
			for range count {
				c, err := f.name()
				if err != nil {
					return err
				}
				if c == "x-ignore-shared" {
					f.ignoreShared = true
				}
			}
		case "configuration/uuid":
			if _, err := f.read(16); err != nil {
				return err
			}
		default:
			return streamErr("unknown configuration subsection %q", id)
		}
	}
}

// untilStopped reads sections until QEMU has stopped the guest, which is
// just before the first section END or FULL; it returns the type of that
// section, whose header it has not read.
func (f *streamFollower) untilStopped() error {
	for {
		t, err := f.r.Peek(1)
		if err != nil {
			return streamErr("stream ended after %d bytes, before the guest was stopped", f.off)
		}
		switch t[0] {
		case vmSectionEnd, vmSectionFull:
			return nil
		case vmEOF:
			return streamErr("end of stream before any device state")
		case vmCommand:
			_, _ = f.u8()
			if _, err := f.u16(); err != nil {
				return err
			}
			n, err := f.u16()
			if err != nil {
				return err
			}
			if err := f.skip(int64(n)); err != nil {
				return err
			}
		case vmSectionStart:
			_, _ = f.u8()
			id, err := f.u32()
			if err != nil {
				return err
			}
			idstr, err := f.name()
			if err != nil {
				return err
			}
			if _, err := f.read(8); err != nil { // instance, version
				return err
			}
			if idstr != "ram" {
				return streamErr("live section %q: only RAM is supported (turn off block migration and dirty-bitmaps)", idstr)
			}
			f.ramSection, f.haveRAM = id, true
			if err := f.ram(); err != nil {
				return err
			}
			f.lastLive = time.Now()
			if err := f.footer(id); err != nil {
				return err
			}
		case vmSectionPart:
			_, _ = f.u8()
			id, err := f.u32()
			if err != nil {
				return err
			}
			if !f.haveRAM || id != f.ramSection {
				return streamErr("section PART of unknown section %d", id)
			}
			if err := f.ram(); err != nil {
				return err
			}
			// QEMU flushes a live section's data up to its EOS before it
			// decides to stop the guest; the footer waits in its buffer.
			f.lastLive = time.Now()
			if err := f.footer(id); err != nil {
				return err
			}
		default:
			return streamErr("section type %#x at byte %d", t[0], f.off)
		}
	}
}

func (f *streamFollower) footer(id uint32) error {
	t, err := f.r.Peek(1)
	if err != nil || t[0] != vmSectionFooter {
		return nil // send-section-footer=off
	}
	_, _ = f.u8()
	got, err := f.u32()
	if err != nil {
		return err
	}
	if got != id {
		return streamErr("footer of section %d closes section %d", got, id)
	}
	return nil
}

// ram reads the records of one RAM section up to its EOS.
func (f *streamFollower) ram() error {
	for {
		v, err := f.u64()
		if err != nil {
			return err
		}
		flags, addr := v&(targetPageSize-1), v&^uint64(targetPageSize-1)
		if flags&^ramFlagsKnown != 0 {
			return streamErr("RAM record flags %#x (compression, xbzrle and multifd are not supported)", flags)
		}
		switch {
		case flags&ramFlagEOS != 0:
			return nil
		case flags&ramFlagMemSize != 0:
			if err := f.blockList(addr | flags&^ramFlagMemSize); err != nil {
				return err
			}
		case flags&(ramFlagZero|ramFlagPage) != 0:
			if flags&ramFlagContinue == 0 {
				if f.lastBlock, err = f.name(); err != nil {
					return err
				}
			}
			size, ok := f.ramBlocks[f.lastBlock]
			if !ok {
				return streamErr("page of unknown RAM block %q", f.lastBlock)
			}
			if addr >= size {
				return streamErr("page at %#x past the end of RAM block %q (%d bytes)", addr, f.lastBlock, size)
			}
			n := int64(1)
			if flags&ramFlagPage != 0 {
				n = targetPageSize
			}
			if err := f.skip(n); err != nil {
				return err
			}
		default:
			return streamErr("RAM record with flags %#x", flags)
		}
	}
}

// blockList reads the RAM block list of the setup section (total bytes in
// the record's address bits).
func (f *streamFollower) blockList(total uint64) error {
	f.ramBlocks = map[string]uint64{}
	for total > 0 {
		id, err := f.name()
		if err != nil {
			return err
		}
		length, err := f.u64()
		if err != nil {
			return err
		}
		if f.ignoreShared {
			if _, err := f.u64(); err != nil { // guest physical address
				return err
			}
		}
		if length > total {
			return streamErr("RAM block %q of %d bytes exceeds the %d announced", id, length, total)
		}
		f.ramBlocks[id] = length
		total -= length
	}
	return nil
}

// completeTail reports whether a saved stream ends the way a completed
// migration's does: QEMU_VM_EOF, then the JSON description of the devices.
func completeTail(b []byte) bool {
	i := len(b) - 1
	if i < 0 || b[i] != '}' {
		return false
	}
	// The description is "QEMU_VM_VMDESCRIPTION, be32 length, JSON", a
	// few KiB.
	for start := i; start >= 6 && len(b)-start <= maxDescription; start-- {
		if b[start] != '{' || b[start-5] != vmDescription || b[start-6] != vmEOF {
			continue
		}
		n := binary.BigEndian.Uint32(b[start-4 : start])
		if int(n) == len(b)-start && json.Valid(b[start:]) {
			return true
		}
	}
	return false
}
