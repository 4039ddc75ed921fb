package virt

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeConf(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu.conf")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestReadQEMUConf(t *testing.T) {
	c, err := ReadQEMUConf(writeConf(t, `# stock file, all commented
#user = "root"
#memory_backing_dir = "/var/lib/libvirt/qemu/ram"
memory_backing_dir = "/dev/shm/remora"
user = "+4242"
group = "+4343"
cgroup_device_acl = [
    "/dev/null", "/dev/full",
]
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.User != "+4242" || c.UID != 4242 || c.GID != 4343 || c.MemoryBackingDir != "/dev/shm/remora" {
		t.Fatalf("got %+v", c)
	}
	if c.SecurityDriver != "" {
		t.Fatalf("security_driver unset, got %q", c.SecurityDriver)
	}
	for conf, want := range map[string]string{`security_driver = "none"`: "none", `security_driver = [ "selinux", "apparmor" ]`: `[ "selinux", "apparmor" ]`} {
		c, err := ReadQEMUConf(writeConf(t, "user = \"+0\"\n"+conf+"\n"))
		if err != nil || c.SecurityDriver != want {
			t.Fatalf("%s: got %q (%v), want %q", conf, c.SecurityDriver, err, want)
		}
	}
	if _, err := ReadQEMUConf(writeConf(t, "user = root\n")); err == nil || !strings.Contains(err.Error(), "quoted") {
		t.Fatalf("unquoted user: %v", err)
	}
	if _, err := ReadQEMUConf(writeConf(t, "user = \"no-such-user-here\"\n")); err == nil || !strings.Contains(err.Error(), "no-such-user-here") {
		t.Fatalf("unknown user: %v", err)
	}
}

func TestCheckReachable(t *testing.T) {
	top := t.TempDir()
	inner := filepath.Join(top, "a", "run")
	if err := os.MkdirAll(inner, 0o755); err != nil {
		t.Fatal(err)
	}
	qemu := QEMUConf{User: "+4242", UID: 4242, GID: 4343}
	if err := os.Chmod(filepath.Join(top, "a"), 0o700); err != nil {
		t.Fatal(err)
	}
	err := qemu.CheckReachable(filepath.Join(inner, "not-yet"), "the agent's sockets")
	if err == nil || !strings.Contains(err.Error(), filepath.Join(top, "a")+" (mode 0700)") || !strings.Contains(err.Error(), "chmod o+x ") {
		t.Fatalf("a 0700 directory on the way: %v", err)
	}
	// Owned by QEMU's group with g+x is enough.
	if err := os.Chown(filepath.Join(top, "a"), 0, 4343); err != nil {
		t.Skip("chown needs root:", err)
	}
	if err := os.Chmod(filepath.Join(top, "a"), 0o710); err != nil {
		t.Fatal(err)
	}
	for d := top; d != "/"; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err == nil && fi.Mode().Perm()&0o001 == 0 {
			if err := os.Chmod(d, fi.Mode().Perm()|0o001); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := qemu.CheckReachable(inner, "the agent's sockets"); err != nil {
		t.Fatal(err)
	}
	if err := (QEMUConf{User: "root"}).CheckReachable("/root/x", "y"); err != nil {
		t.Fatalf("QEMU as root reaches everything: %v", err)
	}
}

func TestCheckRAMFilesystem(t *testing.T) {
	if err := CheckRAMFilesystem("/dev/shm"); err != nil {
		t.Fatalf("/dev/shm: %v", err)
	}
	c := QEMUConf{MemoryBackingDir: "/dev/shm/remora-test-not-created/x"}
	if err := c.CheckMemoryBackingDir(); err != nil {
		t.Fatalf("a tmpfs directory libvirt has not created yet: %v", err)
	}
	c.MemoryBackingDir = "/var/lib/libvirt/qemu/ram"
	if CheckRAMFilesystem("/var/lib") == nil {
		t.Skip("/var/lib is on tmpfs here")
	}
	if err := c.CheckMemoryBackingDir(); err == nil || !strings.Contains(err.Error(), "memory_backing_dir = ") {
		t.Fatalf("libvirt's default on disk: %v", err)
	}
}
