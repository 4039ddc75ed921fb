package labkit

import (
	"context"
	"os"
	"testing"
	"time"
)

// RequireLab skips the test unless REMORA_LAB=1, running as root, with
// libvirt reachable and the lab set up (test/lab/lab.sh up).
func RequireLab(t testing.TB) {
	t.Helper()
	if os.Getenv("REMORA_LAB") != "1" {
		t.Skip("lab test: set REMORA_LAB=1 (as root, after test/lab/lab.sh up) to run against a real guest")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := CheckLab(ctx); err != nil {
		t.Skipf("lab test skipped: %v", err)
	}
}
