package labkit

import (
	"context"
	"testing"
	"time"

	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/migrate/virt"
)

// BootOpen boots a lab guest for a test and opens it over libvirt (QMP
// through the monitor passthrough); all are released at cleanup.
func BootOpen(t testing.TB, ctx context.Context, o GuestOptions) (*Guest, *qemu.Guest, *virt.Conn) {
	t.Helper()
	bctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	lg, err := Boot(bctx, o)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lg.Destroy(); err != nil {
			t.Errorf("destroy %s: %v", lg.Name, err)
		}
	})
	conn, err := virt.Dial(ctx, LibvirtURI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	g, err := conn.OpenGuest(ctx, lg.Name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.Mon.Disconnect() })
	return lg, g, conn
}
