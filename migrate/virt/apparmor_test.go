package virt

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheckAppArmorReach(t *testing.T) {
	const runDir = "/run/remora"
	remoraRules := "  /run/remora/ r,\n  /run/remora/** rwk,\n"
	for _, tc := range []struct {
		name, enabled, local, abstraction, driver string
		wantErr                                   bool
	}{
		{name: "no AppArmor", enabled: "N", local: ""},
		{name: "AppArmor, no rule", enabled: "Y", local: "", wantErr: true},
		{name: "AppArmor, remora's abstraction included", enabled: "Y", local: "include if exists <abstractions/remora-qemu>\n", abstraction: remoraRules},
		{name: "old include syntax", enabled: "Y", local: "#include <abstractions/remora-qemu>\n", abstraction: remoraRules},
		{name: "rule in the local file", enabled: "Y", local: remoraRules},
		{name: "included but the abstraction is gone", enabled: "Y", local: "include if exists <abstractions/remora-qemu>\n", wantErr: true},
		{name: "a commented-out rule", enabled: "Y", local: "# /run/remora/** rwk,\n", wantErr: true},
		{name: "read-only rule", enabled: "Y", local: "/run/remora/** r,\n", wantErr: true},
		{name: "another directory", enabled: "Y", local: "/run/other/** rwk,\n", wantErr: true},
		{name: "security driver none", enabled: "Y", driver: "none"},
		{name: "security driver selinux", enabled: "Y", driver: "selinux"},
		{name: "security driver apparmor, no rule", enabled: "Y", driver: "apparmor", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			f := AppArmorFiles{Enabled: filepath.Join(dir, "enabled"), Local: filepath.Join(dir, "local"), Abstractions: filepath.Join(dir, "abstractions")}
			write := func(p, s string) {
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			write(f.Enabled, tc.enabled+"\n")
			write(f.Local, tc.local)
			if tc.abstraction != "" {
				write(filepath.Join(f.Abstractions, "remora-qemu"), tc.abstraction)
			}
			err := QEMUConf{SecurityDriver: tc.driver}.CheckAppArmorReach(f, runDir, "the agent's sockets")
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error: %v", err, tc.wantErr)
			}
			if err != nil && !strings.Contains(err.Error(), "include if exists <abstractions/remora-qemu>") {
				t.Errorf("the error does not say what to add: %v", err)
			}
		})
	}
}

func TestCheckAppArmorReachPackagedRules(t *testing.T) {
	// The abstraction the package ships covers the default runtime_dir.
	dir := t.TempDir()
	f := AppArmorFiles{Enabled: filepath.Join(dir, "enabled"), Local: filepath.Join(dir, "local"), Abstractions: "../../configs/apparmor"}
	if err := os.WriteFile(f.Enabled, []byte("Y\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.Local, []byte("include if exists <abstractions/remora-qemu>\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := (QEMUConf{}).CheckAppArmorReach(f, "/run/remora", "the agent's sockets"); err != nil {
		t.Fatal(err)
	}
}
