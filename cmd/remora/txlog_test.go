package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/remora-ha/remora/txlog"
)

// buildLog writes a small real log: a committed, an in-doubt and a
// presumed-aborted transaction, plain records and a checkpoint.
func buildLog(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	l, _, err := txlog.Open(dir, txlog.Options{SegmentSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, r := range []txlog.Record{
		{Type: txlog.TypeBegin, TxID: 1},
		{Type: txlog.TypeData, TxID: 1, Payload: []byte("set disk=vda")},
		{Type: txlog.TypeCommit, TxID: 1},
		{Type: txlog.TypeBegin, TxID: 2},
		{Type: txlog.TypeData, TxID: 2, Payload: []byte{0x00, 0xff, 0x10}},
		{Type: txlog.TypePrepare, TxID: 2},
		{Type: txlog.TypeBegin, TxID: 3},
		{Type: txlog.TypePlain, Payload: bytes.Repeat([]byte("long "), 20)},
	} {
		r.Epoch = 7
		if _, err := l.Append(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := l.Checkpoint(ctx, 7, []byte("snapshot")); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Append(ctx, txlog.Record{Type: txlog.TypePlain, Epoch: 7, Payload: []byte("tail")}); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

func runTxlogCLI(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := newTxlogCmd()
	var out, errb bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	cmd.SetArgs(args)
	err = cmd.Execute()
	return out.String(), errb.String(), err
}

func onlySegment(t *testing.T, dir string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(m) != 1 {
		t.Fatalf("want one segment, got %v", m)
	}
	return m[0]
}

func TestDump(t *testing.T) {
	dir := buildLog(t)
	out, _, err := runTxlogCLI(t, "dump", dir)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 11 || !strings.HasPrefix(lines[0], "LSN") {
		t.Fatalf("dump printed %d lines:\n%s", len(lines), out)
	}
	for _, want := range []string{`DATA  `, `"set disk=vda"`, `0x00ff10`, `CHECKPOINT`, `live=3 data=8B "snapshot"`, `"...`, `PREPARE`} {
		if !strings.Contains(out, want) {
			t.Errorf("dump output lacks %q:\n%s", want, out)
		}
	}
	if f := strings.Fields(lines[2]); len(f) < 6 || f[0] != "2" || f[1] != "DATA" || f[2] != "7" || f[3] != "1" || f[4] != "12" {
		t.Errorf("record line = %q", lines[2])
	}

	out, _, err = runTxlogCLI(t, "dump", "--json", "--from", "5", "--limit", "5", dir)
	if err != nil {
		t.Fatal(err)
	}
	var recs []map[string]any
	for _, ln := range strings.Split(strings.TrimSpace(out), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(ln), &m); err != nil {
			t.Fatalf("bad JSON line %q: %v", ln, err)
		}
		recs = append(recs, m)
	}
	if len(recs) != 5 || recs[0]["lsn"] != 5.0 || recs[0]["preview_hex"] != "00ff10" || recs[4]["type"] != "CHECKPOINT" {
		t.Fatalf("JSON dump: %v", recs)
	}
	if live, _ := recs[4]["live"].([]any); len(live) != 3 {
		t.Fatalf("checkpoint live set in JSON: %v", recs[4])
	}
}

func TestVerifySound(t *testing.T) {
	dir := buildLog(t)
	out, errOut, err := runTxlogCLI(t, "verify", dir)
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	for _, want := range []string{"sound", "LSN 1..10", "checkpoint:   LSN 9, 3 live", "1 committed, 1 aborted (1 presumed), 1 in doubt", "epoch:        7"} {
		if !strings.Contains(out, want) {
			t.Errorf("verify output lacks %q:\n%s", want, out)
		}
	}
	if errOut != "" {
		t.Errorf("unexpected stderr: %s", errOut)
	}
}

func TestVerifyTornTailIsReadOnlyWarning(t *testing.T) {
	dir := buildLog(t)
	seg := onlySegment(t, dir)
	data, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	// Append garbage after the last record, as a torn write would leave.
	end := bytes.LastIndex(data, []byte("tail")) + len("tail")
	copy(data[end:], "GARBAGE!")
	if err := os.WriteFile(seg, data, 0o644); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := runTxlogCLI(t, "verify", dir)
	if err != nil {
		t.Fatalf("verify with a torn tail should succeed: %v", err)
	}
	if !strings.Contains(errOut, "warning: torn tail") || !strings.Contains(errOut, "8 bytes after LSN 10") {
		t.Fatalf("missing torn-tail warning, stderr: %s", errOut)
	}
	if !strings.Contains(out, "torn tail:    8 bytes") {
		t.Fatalf("summary lacks torn tail: %s", out)
	}
	after, err := os.ReadFile(seg)
	if err != nil || !bytes.Equal(after, data) {
		t.Fatal("verify modified the segment")
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "*.torn-*")); len(m) != 0 {
		t.Fatalf("verify saved a torn file: %v", m)
	}
}

func TestVerifyMidLogCorruption(t *testing.T) {
	dir := buildLog(t)
	seg := onlySegment(t, dir)
	data, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	off := bytes.Index(data, []byte("set disk=vda"))
	data[off] ^= 0x01
	if err := os.WriteFile(seg, data, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = runTxlogCLI(t, "verify", dir)
	if err == nil {
		t.Fatal("verify accepted a log with a damaged durable record")
	}
	if !strings.Contains(err.Error(), seg) || !strings.Contains(err.Error(), "offset ") {
		t.Fatalf("error does not name segment and offset: %v", err)
	}
	if _, _, err := runTxlogCLI(t, "dump", dir); err == nil {
		t.Fatal("dump of a corrupt log succeeded")
	}
}

func TestVerifyMissingDir(t *testing.T) {
	if _, _, err := runTxlogCLI(t, "verify", filepath.Join(t.TempDir(), "nope")); err == nil {
		t.Fatal("verify of a missing directory succeeded")
	}
	if _, _, err := runTxlogCLI(t, "verify", t.TempDir()); err == nil || !strings.Contains(err.Error(), "no log segments") {
		t.Fatalf("verify of an empty directory: %v", err)
	}
}
