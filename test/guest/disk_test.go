package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRecordRoundTrip(t *testing.T) {
	p := make([]byte, RecordSize)
	stampRecord(p, 77, 5)
	if i, err := parseRecord(p, 77); i != 5 || err != nil {
		t.Fatal(i, err)
	}
	if i, err := parseRecord(p, 78); i != 0 || err != nil {
		t.Fatalf("record of another run: %d %v, want absent", i, err)
	}
	if i, err := parseRecord(make([]byte, RecordSize), 77); i != 0 || err != nil {
		t.Fatalf("zero slot: %d %v", i, err)
	}
	torn := bytes.Clone(p)
	q := make([]byte, RecordSize)
	stampRecord(q, 77, 6)
	copy(torn[2048:], q[2048:]) // second half of another write
	if _, err := parseRecord(torn, 77); err == nil || !strings.Contains(err.Error(), "torn") {
		t.Fatalf("torn record: %v", err)
	}
	garbage := bytes.Repeat([]byte{0xa5}, RecordSize)
	if _, err := parseRecord(garbage, 77); err == nil {
		t.Fatal("garbage accepted")
	}
}

func newTestDisk(t *testing.T, slots int) (*DiskWriter, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(p, make([]byte, slots*RecordSize), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := OpenDiskWriter(p, false, 0, 1234)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.f.Close() })
	return d, p
}

func TestDiskWriterAndCheck(t *testing.T) {
	d, _ := newTestDisk(t, 8)
	if n, extra, err := d.Check(); n != 0 || extra != 0 || err != nil {
		t.Fatal(n, extra, err)
	}
	for i := 0; i < 21; i++ { // wraps around twice
		if err := d.WriteNext(); err != nil {
			t.Fatal(err)
		}
		if n, extra, err := d.Check(); n != uint64(i+1) || extra != 0 || err != nil {
			t.Fatalf("after %d records: n=%d extra=%d %v", i+1, n, extra, err)
		}
	}
	st := d.Stats()
	if st.Count != 21 || st.Slots != 8 || st.LatP99 == 0 || st.Checks != 22 {
		t.Fatalf("stats %+v", st)
	}
}

// The disk as a checkpoint can find it: check a snapshot of the device
// against a count, as the restored writer would.
func TestCheckRecordsCases(t *testing.T) {
	const slots, seed = 8, 99
	disk := func(records ...uint64) *bytes.Reader {
		b := make([]byte, slots*RecordSize)
		for _, i := range records {
			stampRecord(b[(i-1)%slots*RecordSize:], seed, i)
		}
		return bytes.NewReader(b)
	}
	seq := func(from, to uint64) []uint64 {
		var r []uint64
		for i := from; i <= to; i++ {
			r = append(r, i)
		}
		return r
	}
	for _, tc := range []struct {
		name  string
		disk  *bytes.Reader
		n     uint64
		extra int
		fail  string
	}{
		{"empty", disk(), 0, 0, ""},
		{"three", disk(1, 2, 3), 3, 0, ""},
		{"next written, not counted", disk(1, 2, 3, 4), 3, 1, ""},
		{"wrapped", disk(seq(1, 13)...), 13, 0, ""},
		{"wrapped, next written", disk(seq(1, 14)...), 13, 1, ""},
		{"first record at n+1 only", disk(1), 0, 1, ""},
		{"lost write", disk(1, 3), 3, 0, "record 2 missing"},
		{"lost write after wrap", disk(seq(1, 10)...), 12, 0, "lost write"},
		{"two beyond", disk(1, 2, 3, 4, 5), 3, 0, "beyond"},
		{"count ahead of the disk", disk(1, 2), 3, 0, "record 3 missing"},
	} {
		extra, err := checkRecords(tc.disk, slots, seed, tc.n, nil)
		if tc.fail == "" && (err != nil || extra != tc.extra) {
			t.Errorf("%s: extra %d err %v, want extra %d", tc.name, extra, err, tc.extra)
		}
		if tc.fail != "" && (err == nil || !strings.Contains(err.Error(), tc.fail)) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.fail)
		}
	}
	// A torn record fails, wherever it is.
	b := make([]byte, slots*RecordSize)
	for i := uint64(1); i <= 3; i++ {
		stampRecord(b[(i-1)*RecordSize:], seed, i)
	}
	b[RecordSize+100] ^= 0xff
	if _, err := checkRecords(bytes.NewReader(b), slots, seed, 3, nil); err == nil || !strings.Contains(err.Error(), "slot 1: torn") {
		t.Fatalf("torn record: %v", err)
	}
}

func TestDiskProtocol(t *testing.T) {
	d, _ := newTestDisk(t, 64)
	r := NewRegion(4)
	s := NewServer(r, NewWriter(r, 0), d)
	go d.Run(make(chan struct{}))
	if got := s.Handle("disk 500"); got != "ok" {
		t.Fatal(got)
	}
	time.Sleep(100 * time.Millisecond)
	if got := s.Handle("disk 0"); got != "ok" {
		t.Fatal(got)
	}
	got := s.Handle("diskcheck")
	if !strings.HasPrefix(got, "ok n=") || strings.HasPrefix(got, "ok n=0 ") {
		t.Fatalf("diskcheck %q", got)
	}
	if st := s.Handle("stats"); !strings.Contains(st, " disk_records=") || !strings.Contains(st, " disk_lat_p99_us=") {
		t.Fatalf("stats %q", st)
	}
	if got := s.Handle("disk x"); !strings.HasPrefix(got, "err") {
		t.Fatal(got)
	}
	none := NewServer(r, NewWriter(r, 0), nil)
	if got := none.Handle("diskcheck"); !strings.HasPrefix(got, "err no disk") {
		t.Fatal(got)
	}
	if st := none.Handle("stats"); strings.Contains(st, "disk_") {
		t.Fatalf("stats without a disk: %q", st)
	}
}
