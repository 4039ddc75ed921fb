package names

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestNames(t *testing.T) {
	for _, n := range []string{"web1", "host-a", "e2e-campaign-host-b", "db.prod_2", strings.Repeat("a", 64)} {
		if !ValidGuest(n) {
			t.Errorf("guest %q refused", n)
		}
	}
	for _, n := range []string{"", ".", "..", "../x", "../../../../tmp/x", "a/b", "-x", ".hidden", "a b", "a\x00b", "x\n", strings.Repeat("a", 65), "é"} {
		if ValidGuest(n) {
			t.Errorf("guest %q accepted", n)
		}
		if ValidAgent(n) {
			t.Errorf("agent %q accepted", n)
		}
	}
	if ValidAgent("ca") || ValidAgent(strings.Repeat("a", 64)) {
		t.Error("agent ca or 64 characters accepted")
	}
	for _, d := range []string{"vda", "sdb", "hda", "xvda", "nvme0n1"} {
		if !ValidDev(d) {
			t.Errorf("dev %q refused", d)
		}
	}
	for _, d := range []string{"", "VDA", "../vda", "vda/x", "1a", "vda.img", strings.Repeat("a", 17)} {
		if ValidDev(d) {
			t.Errorf("dev %q accepted", d)
		}
	}
	if err := Guest("guest", "../x"); err == nil || !strings.Contains(err.Error(), GuestRule) {
		t.Errorf("error %v does not give the rule", err)
	}
}

// FuzzNames checks that a valid name joined to a root never leaves it.
func FuzzNames(f *testing.F) {
	for _, s := range []string{"web1", "..", "../x", "a/b", "vda"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, ok := range []bool{ValidGuest(s), ValidAgent(s), ValidDev(s)} {
			if !ok {
				continue
			}
			p := filepath.Join("/root", s)
			if filepath.Dir(p) != "/root" || filepath.Base(p) != s {
				t.Fatalf("valid name %q leaves its directory: %s", s, p)
			}
		}
	})
}
