package disk

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
)

// Redo file (big endian):
//
//	header  "RMDREDO1", u32 version, u32 reserved, u64 first, u64 last, u64 image size
//	record  u8 kind (1 data, 2 zeroes), u64 offset, u32 length, data (kind 1)
//	trailer u8 0xff, u64 records, u64 bytes, u32 CRC-32C of everything before it
//
// Applying its records in order brings an image that holds epoch first-1
// (or any later epoch up to last) to epoch last.
const (
	redoMagic      = "RMDREDO1"
	redoVersion    = 1
	redoHeaderLen  = 40
	redoRecordLen  = 13
	redoTrailerLen = 21
	kindData       = 1
	kindZero       = 2
	kindEnd        = 0xff
	// maxDataLen bounds a data record (it is read into memory); a zero
	// record may cover any u32 length, as an NBD TRIM or WRITE_ZEROES can.
	maxDataLen = 1 << 30
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorruptRedo marks a redo file that is truncated or damaged; nothing
// of it was applied.
var ErrCorruptRedo = errors.New("corrupt redo file")

type crcWriter struct {
	w   *bufio.Writer
	crc uint32
	n   int64
}

func (c *crcWriter) Write(p []byte) (int, error) {
	c.crc = crc32.Update(c.crc, castagnoli, p)
	c.n += int64(len(p))
	return c.w.Write(p)
}

func writeRedo(path string, first, last uint64, size int64, eps []*epochWrites) (StageInfo, error) {
	info := StageInfo{First: first, Last: last, Epochs: len(eps)}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return info, err
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	cw := &crcWriter{w: bufio.NewWriterSize(f, 1<<20)}
	var h [redoHeaderLen]byte
	copy(h[:], redoMagic)
	binary.BigEndian.PutUint32(h[8:], redoVersion)
	binary.BigEndian.PutUint64(h[16:], first)
	binary.BigEndian.PutUint64(h[24:], last)
	binary.BigEndian.PutUint64(h[32:], uint64(size))
	cw.Write(h[:])
	var r [redoRecordLen]byte
	for _, e := range eps {
		for _, x := range e.writes {
			r[0] = kindData
			if x.data == nil {
				r[0] = kindZero
			}
			binary.BigEndian.PutUint64(r[1:], uint64(x.off))
			binary.BigEndian.PutUint32(r[9:], uint32(x.n))
			cw.Write(r[:])
			if x.data != nil {
				cw.Write(x.data)
			}
			info.Writes++
			info.Bytes += x.n
		}
	}
	var tr [redoTrailerLen]byte
	tr[0] = kindEnd
	binary.BigEndian.PutUint64(tr[1:], uint64(info.Writes))
	binary.BigEndian.PutUint64(tr[9:], uint64(info.Bytes))
	cw.Write(tr[:17])
	binary.BigEndian.PutUint32(tr[17:], cw.crc)
	if _, err := cw.w.Write(tr[17:]); err != nil {
		return info, err
	}
	if err := cw.w.Flush(); err != nil {
		return info, err
	}
	info.FileBytes = cw.n + 4
	if err := f.Sync(); err != nil {
		return info, err
	}
	if err := f.Close(); err != nil {
		return info, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return info, err
	}
	ok = true
	return info, syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// redoRecord is one write of a parsed redo file; data nil means zeroes.
type redoRecord struct {
	off  int64
	n    int64
	data []byte
}

// parseRedo checks a whole redo file and returns its records (data points
// into b).
func parseRedo(b []byte, size int64) (ApplyInfo, []redoRecord, error) {
	var info ApplyInfo
	bad := func(format string, a ...any) (ApplyInfo, []redoRecord, error) {
		return info, nil, fmt.Errorf("%w: %s", ErrCorruptRedo, fmt.Sprintf(format, a...))
	}
	if len(b) < redoHeaderLen+redoTrailerLen {
		return bad("%d bytes, too short", len(b))
	}
	if string(b[:8]) != redoMagic {
		return bad("bad magic %q", b[:8])
	}
	if v := binary.BigEndian.Uint32(b[8:]); v != redoVersion {
		return bad("version %d, want %d", v, redoVersion)
	}
	body, sum := b[:len(b)-4], binary.BigEndian.Uint32(b[len(b)-4:])
	if c := crc32.Checksum(body, castagnoli); c != sum {
		return bad("checksum %08x, stored %08x", c, sum)
	}
	info.First = binary.BigEndian.Uint64(b[16:])
	info.Last = binary.BigEndian.Uint64(b[24:])
	if sz := int64(binary.BigEndian.Uint64(b[32:])); sz != size {
		return info, nil, fmt.Errorf("redo file for a %d-byte image, this image has %d bytes", sz, size)
	}
	if info.First > info.Last+1 {
		return bad("epochs %d..%d", info.First, info.Last)
	}
	var recs []redoRecord
	p := b[redoHeaderLen:]
	for {
		if len(p) < 1 {
			return bad("no trailer")
		}
		if p[0] == kindEnd {
			if len(p) != redoTrailerLen {
				return bad("%d bytes after the trailer mark, want %d", len(p), redoTrailerLen)
			}
			n, bytes := binary.BigEndian.Uint64(p[1:]), binary.BigEndian.Uint64(p[9:])
			if n != uint64(len(recs)) || bytes != uint64(info.Bytes) {
				return bad("trailer says %d records of %d bytes, file has %d of %d", n, bytes, len(recs), info.Bytes)
			}
			info.Writes = len(recs)
			return info, recs, nil
		}
		if len(p) < redoRecordLen {
			return bad("record header truncated")
		}
		kind := p[0]
		r := redoRecord{off: int64(binary.BigEndian.Uint64(p[1:])), n: int64(binary.BigEndian.Uint32(p[9:]))}
		p = p[redoRecordLen:]
		if r.off < 0 || (kind == kindData && r.n > maxDataLen) || r.off > size || r.n > size-r.off {
			return bad("record %d: range [%d, +%d) outside the image", len(recs), r.off, r.n)
		}
		switch kind {
		case kindData:
			if int64(len(p)) < r.n {
				return bad("record %d: data truncated", len(recs))
			}
			r.data, p = p[:r.n], p[r.n:]
		case kindZero:
		default:
			return bad("record %d: kind %d", len(recs), kind)
		}
		recs = append(recs, r)
		info.Bytes += r.n
	}
}

func applyRedo(img Image, size int64, path string) (ApplyInfo, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return ApplyInfo{}, err
	}
	info, recs, err := parseRedo(b, size)
	if err != nil {
		return info, fmt.Errorf("apply %s: %w", path, err)
	}
	for _, r := range recs {
		if r.data != nil {
			_, err = img.WriteAt(r.data, r.off)
		} else {
			err = zeroRange(img, r.off, r.n)
		}
		if err != nil {
			return info, fmt.Errorf("apply %s: write the image: %w", path, err)
		}
	}
	if err := img.Sync(); err != nil {
		return info, fmt.Errorf("apply %s: sync the image: %w", path, err)
	}
	return info, nil
}

// ApplyRedo applies a redo file to the image file at imagePath without a
// Target: for an agent that restarts with a committed epoch not applied.
func ApplyRedo(imagePath, redoPath string) (ApplyInfo, error) {
	f, err := os.OpenFile(imagePath, os.O_RDWR, 0)
	if err != nil {
		return ApplyInfo{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ApplyInfo{}, err
	}
	info, err := applyRedo(f, fi.Size(), redoPath)
	if err != nil {
		return info, err
	}
	return info, f.Close()
}
