package arbiter

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// unsynced lists the created directories, and their parents, that were
// not fsynced.
func unsynced(created, synced []string) []string {
	var out []string
	for _, d := range created {
		for _, p := range []string{d, filepath.Dir(d)} {
			if !slices.Contains(synced, p) && !slices.Contains(out, p) {
				out = append(out, p)
			}
		}
	}
	return out
}

// TestStateDirCreatedDurably: every directory openStore creates is
// fsynced, and so is its parent. The control, a plain os.MkdirAll as
// before, must fail the same check.
func TestStateDirCreatedDurably(t *testing.T) {
	orig := syncDir
	t.Cleanup(func() { syncDir = orig })
	var synced []string
	syncDir = func(dir string) error {
		synced = append(synced, dir)
		return orig(dir)
	}
	base := t.TempDir()
	state := filepath.Join(base, "a", "b")
	created := []string{filepath.Join(base, "a"), state, filepath.Join(state, "guests")}

	st, _, err := openStore(state)
	ok(t, err)
	st.close()
	if missing := unsynced(created, synced); len(missing) != 0 {
		t.Fatalf("not fsynced: %v (synced %v)", missing, synced)
	}
	// Nothing new to make durable on the next start.
	synced = nil
	st, _, err = openStore(state)
	ok(t, err)
	st.close()
	if len(synced) != 0 {
		t.Fatalf("fsynced existing directories: %v", synced)
	}

	synced = nil
	other := filepath.Join(base, "c", "guests")
	ok(t, os.MkdirAll(other, 0o700))
	if missing := unsynced([]string{filepath.Dir(other), other}, synced); len(missing) == 0 {
		t.Fatal("control: the check does not catch a directory created without fsync")
	}
}

func TestStateDirNotADirectory(t *testing.T) {
	state := t.TempDir()
	ok(t, os.WriteFile(filepath.Join(state, "guests"), nil, 0o600))
	if _, _, err := openStore(state); err == nil || !strings.Contains(err.Error(), "guests is not a directory") {
		t.Fatalf("a file as the guests directory: %v", err)
	}
}
