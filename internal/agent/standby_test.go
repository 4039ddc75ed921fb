package agent

import (
	"context"
	"strings"
	"testing"

	"github.com/remora-ha/remora/internal/agent/api"
)

// TestDropReplicaOnlyByItsPrimary: another agent cannot make a standby
// drop a replica it does not feed; the replica stays.
func TestDropReplicaOnlyByItsPrimary(t *testing.T) {
	a := &Agent{log: quietLog(), standby: map[string]*standbyGuest{
		"g1": {rec: &Record{Name: "g1", Role: api.RoleStandby, Primary: "host-a", Fence: 3}},
	}}
	err := a.dropReplica(context.Background(), "g1", 3, "host-c")
	if err == nil || !strings.Contains(err.Error(), `its primary is agent "host-a"`) {
		t.Fatalf("unenroll by another agent: %v", err)
	}
	if _, ok := a.standby["g1"]; !ok {
		t.Fatal("replica forgotten after a refused unenroll")
	}
	err = a.dropReplica(context.Background(), "g1", 2, "host-a")
	if err == nil || !strings.Contains(err.Error(), "stale fencing epoch 2") {
		t.Fatalf("unenroll with a stale epoch: %v", err)
	}
}
