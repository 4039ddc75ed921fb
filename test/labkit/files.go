package labkit

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// BuildRemora builds the remora binary into dir and returns its path.
func BuildRemora(dir string) (string, error) {
	bin := filepath.Join(dir, "remora")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/remora-ha/remora/cmd/remora").CombinedOutput(); err != nil {
		return "", fmt.Errorf("build remora: %v\n%s", err, out)
	}
	return bin, nil
}

// CreateDataDisk creates a sparse raw image of size bytes for
// GuestOptions.DataDisk. Keep it off tmpfs: cache='none' opens it with
// O_DIRECT.
func CreateDataDisk(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// QEMUTempDir is t.TempDir made searchable by QEMU, which libvirt runs as
// its own user (Debian: libvirt-qemu): for guest disks and agent
// directories. Go makes both the test's directory and its parent 0700.
func QEMUTempDir(t testing.TB) string {
	t.Helper()
	d := t.TempDir()
	for _, p := range []string{filepath.Dir(d), d} {
		if err := os.Chmod(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// LabHooks is where the lab's libvirt hook (test/lab/lab.sh) finds the
// agents whose `remora libvirt-hook` it runs.
const LabHooks = AgentRunDir + "/lab-hooks"

// RegisterHook has the lab's libvirt hook ask the agent with config (run
// by binary bin) before any domain starts, until the test ends.
func RegisterHook(t testing.TB, bin, config string) {
	t.Helper()
	if err := os.MkdirAll(LabHooks, 0o755); err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(LabHooks, strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())+"-"+filepath.Base(filepath.Dir(config)))
	if err := os.WriteFile(f, []byte(bin+" "+config+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(f) })
}
