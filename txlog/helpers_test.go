package txlog

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

func mustOpen(t testing.TB, dir string, opts Options) (*Log, Recovery) {
	t.Helper()
	l, rec, err := Open(dir, opts)
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	return l, rec
}

func mustAppend(t testing.TB, l *Log, r Record) LSN {
	t.Helper()
	lsn, err := l.Append(context.Background(), r)
	if err != nil {
		t.Fatalf("Append(%v tx %d): %v", r.Type, r.TxID, err)
	}
	return lsn
}

func mustClose(t testing.TB, l *Log) {
	t.Helper()
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

func readAllRecords(t testing.TB, l *Log, from LSN) []Record {
	t.Helper()
	var out []Record
	if err := l.Iterate(from, func(r Record) error { out = append(out, r); return nil }); err != nil {
		t.Fatalf("Iterate(%d): %v", from, err)
	}
	return out
}

func sameRecord(a, b Record) bool {
	return a.LSN == b.LSN && a.Type == b.Type && a.Epoch == b.Epoch && a.TxID == b.TxID && bytes.Equal(a.Payload, b.Payload)
}

// segFiles lists segment paths in LSN order.
func segFiles(t testing.TB, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// dirSnapshot maps file names to contents, to prove read-only opens leave
// a directory alone.
func dirSnapshot(t testing.TB, dir string) map[string]string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = string(b)
	}
	return m
}

func payloadFor(lsn LSN, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte('a' + (int(lsn)+i)%26)
	}
	return p
}
