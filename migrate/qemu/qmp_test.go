package qemu

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// stuckMonitor never answers, like a QEMU whose stop waits on a dead disk.
type stuckMonitor struct{ release chan struct{} }

func (m stuckMonitor) Connect() error    { return nil }
func (m stuckMonitor) Disconnect() error { return nil }
func (m stuckMonitor) Events(context.Context) (<-chan qmp.Event, error) {
	return nil, errors.New("no events")
}
func (m stuckMonitor) Run([]byte) ([]byte, error) {
	<-m.release
	return []byte(`{"return":{}}`), nil
}

func TestExecBoundedByContext(t *testing.T) {
	m := stuckMonitor{release: make(chan struct{})}
	defer close(m.release)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Stop(ctx, m) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("stop on a stuck QEMU: %v, want the deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Exec ignored its context: a stuck stop held the caller")
	}
	if err := Stop(ctx, m); err == nil {
		t.Fatal("a command was sent after the context ended")
	}
}
