package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

var units = []string{"remora-agent.service", "remora-arbiter.service"}

// unitExec returns the ExecStart arguments of a shipped unit.
func unitExec(t *testing.T, unit string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "configs", "systemd", unit))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
			return strings.Fields(v)
		}
	}
	t.Fatalf("%s has no ExecStart", unit)
	return nil
}

// The units start commands and flags this binary has.
func TestUnitsRunRealCommands(t *testing.T) {
	for _, u := range units {
		args := unitExec(t, u)
		if args[0] != "/usr/bin/remora" {
			t.Errorf("%s runs %s, make install puts remora in /usr/bin", u, args[0])
		}
		root := newRootCmd()
		cmd, rest, err := root.Find(args[1:])
		if err != nil || cmd == root {
			t.Fatalf("%s: %v: no such command (%v)", u, args[1:], err)
		}
		if err := cmd.ParseFlags(rest); err != nil {
			t.Errorf("%s: %v", u, err)
		}
		if cfg, _ := cmd.Flags().GetString("config"); cfg == "" {
			t.Errorf("%s gives no --config", u)
		}
	}
}

// systemd-analyze verify in a root holding the units, the host's own
// system units and a stand-in /usr/bin/remora; any output is a defect
// (verify exits 0 on a directive it ignores).
func TestUnitsVerify(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (apt-get install systemd)")
	}
	root := t.TempDir()
	for _, d := range []string{"usr/bin", "etc/systemd/system", "usr/lib/systemd"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("cp", "-a", "/usr/lib/systemd/system", filepath.Join(root, "usr/lib/systemd/")).CombinedOutput(); err != nil {
		t.Fatalf("copy the system units: %v %s", err, out)
	}
	if err := os.WriteFile(filepath.Join(root, "usr/bin/remora"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	verify := func(src string) string {
		var paths []string
		for _, u := range units {
			b, err := os.ReadFile(filepath.Join(src, u))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(root, "etc/systemd/system", u), b, 0o644); err != nil {
				t.Fatal(err)
			}
			paths = append(paths, "/etc/systemd/system/"+u)
		}
		out, err := exec.Command(sa, append([]string{"verify", "--man=no", "--root=" + root}, paths...)...).CombinedOutput()
		if err != nil && len(out) == 0 {
			out = []byte(err.Error())
		}
		return strings.TrimSpace(string(out))
	}
	if out := verify(filepath.Join("..", "..", "configs", "systemd")); out != "" {
		t.Fatalf("systemd-analyze verify:\n%s", out)
	}
	// Negative control: a misspelt value is caught.
	bad := t.TempDir()
	for _, u := range units {
		b, _ := os.ReadFile(filepath.Join("..", "..", "configs", "systemd", u))
		os.WriteFile(filepath.Join(bad, u), []byte(strings.Replace(string(b), "Type=notify", "Type=notfy", 1)), 0o644)
	}
	if out := verify(bad); !strings.Contains(out, "notfy") {
		t.Fatalf("a misspelt Type= went unreported: %q", out)
	}
}
