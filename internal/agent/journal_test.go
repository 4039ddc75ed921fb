package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/txlog"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestJournalRebuildsReplicaState commits and applies epochs through the
// Replica's persist hook, reopens the journal and expects the same state;
// an epoch committed but not applied comes back as needing redo.
func TestJournalRebuildsReplicaState(t *testing.T) {
	dir := t.TempDir()
	j, st, err := openJournal(dir, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.guests) != 0 {
		t.Fatalf("fresh journal has guests: %v", st.guests)
	}
	persist := j.replicaPersist("g1")
	step := func(epoch uint64, full, apply bool) {
		t.Helper()
		if err := j.epochBegin("g1", epoch, "gen1", full); err != nil {
			t.Fatal(err)
		}
		prev, _ := j.state("g1")
		next := prev.Replica
		next.Committed, next.Generation = epoch, "gen1"
		if full {
			next.Synced = true
		}
		if err := persist(next); err != nil {
			t.Fatal(err)
		}
		if apply {
			next.Applied = epoch
			if err := persist(next); err != nil {
				t.Fatal(err)
			}
		}
	}
	step(1, true, true)
	step(2, false, true)
	step(3, false, false) // crash between commit and apply
	if err := j.close(); err != nil {
		t.Fatal(err)
	}

	j2, st2, err := openJournal(dir, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer j2.close()
	got := st2.guests["g1"].Replica
	want := checkpoint.ReplicaState{Generation: "gen1", Committed: 3, Applied: 2, Synced: true}
	if got != want {
		t.Fatalf("recovered %+v, want %+v", got, want)
	}
	if _, ok := st2.commitTx["g1"]; !ok {
		t.Fatal("the committed, unapplied epoch's transaction was not recovered for its END")
	}
	// Redo: applying epoch 3 after the restart ends its transaction.
	next := got
	next.Applied = 3
	if err := j2.replicaPersist("g1")(next); err != nil {
		t.Fatalf("END after recovery: %v", err)
	}
}

// TestJournalFailoverInDoubt: a failover prepared but not committed is
// reported for resumption; one committed and ended is not.
func TestJournalFailoverInDoubt(t *testing.T) {
	dir := t.TempDir()
	j, _, err := openJournal(dir, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	begin := func(guest string, fence uint64) uint64 {
		tx := j.newTx()
		ev := journalEvent{Kind: "failover", Guest: guest, Epoch: 7, Fence: fence}
		for _, r := range []struct {
			typ  txlog.RecordType
			step string
		}{{txlog.TypeBegin, ""}, {txlog.TypeData, "resolved"}, {txlog.TypePrepare, "prepared"}} {
			ev.Step = r.step
			if err := j.append(ctx, true, r.typ, tx, ev); err != nil {
				t.Fatal(err)
			}
		}
		return tx
	}
	begin("in-doubt", 2)
	done := begin("finished", 3)
	ev := journalEvent{Kind: "failover", Guest: "finished", Fence: 3}
	if err := j.append(ctx, true, txlog.TypeCommit, done, ev); err != nil {
		t.Fatal(err)
	}
	if err := j.append(ctx, true, txlog.TypeEnd, done, ev); err != nil {
		t.Fatal(err)
	}
	j.close()

	j2, st, err := openJournal(dir, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer j2.close()
	f, ok := st.failovers["in-doubt"]
	if !ok || f.committed || f.fence != 2 {
		t.Fatalf("in-doubt failover recovered as %+v (present %v)", f, ok)
	}
	if _, ok := st.failovers["finished"]; ok {
		t.Fatal("an ended failover was reported for resumption")
	}
	if j2.fence < 3 {
		t.Fatalf("journal fencing epoch %d, want 3", j2.fence)
	}
	// A record with an older fencing epoch than the log has seen is refused.
	if _, err := j2.log.Append(ctx, txlog.Record{Type: txlog.TypePlain, Epoch: 1}); err == nil {
		t.Fatal("stale fencing epoch accepted by the journal")
	}
}

// A full disk under state_dir makes journal writes fail, and the journal
// recovers by itself once space is back: no agent restart needed.
func TestJournalRecoversFromAFullDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	journalSegmentSize = 64 << 10 // full segments come quickly
	t.Cleanup(func() { journalSegmentSize = 8 << 20 })
	j, _, err := openJournal(dir, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer j.close()
	persist := j.replicaPersist("g1")
	commit := func(epoch uint64) error {
		if err := j.epochBegin("g1", epoch, "gen1", epoch == 1); err != nil {
			return err
		}
		return persist(checkpoint.ReplicaState{Generation: "gen1", Committed: epoch, Synced: true})
	}
	if err := commit(1); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	fill := exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=1M", "count=64")
	_ = fill.Run() // fails with ENOSPC once the tmpfs is full: that is the point
	var failed error
	e := uint64(2)
	for ; e < 2000; e++ {
		if failed = commit(e); failed != nil {
			break
		}
		if err := persist(checkpoint.ReplicaState{Generation: "gen1", Committed: e, Applied: e, Synced: true}); err != nil {
			t.Fatalf("apply of epoch %d failed where its commit did not: %v", e, err)
		}
	}
	if failed == nil {
		t.Fatal("no journal write failed on a full disk")
	}
	t.Logf("on a full disk: %v", failed)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	// The primary sends the epoch whose commit failed again: it commits
	// and applies (a commit that did not reach the disk is not counted
	// as done).
	if err := commit(e); err != nil {
		t.Fatalf("resent epoch %d: %v", e, err)
	}
	if err := persist(checkpoint.ReplicaState{Generation: "gen1", Committed: e, Applied: e, Synced: true}); err != nil {
		t.Fatalf("apply of the resent epoch %d: %v", e, err)
	}
	if err := commit(5000); err != nil {
		t.Fatalf("journal still refuses after space came back: %v", err)
	}
	st, _ := j.state("g1")
	if st.Replica.Committed != 5000 {
		t.Fatalf("state %+v after recovery", st.Replica)
	}
	// What is on disk agrees with what the journal says.
	j.close()
	j2, jst, err := openJournal(dir, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer j2.close()
	if jst.guests["g1"].Replica.Committed != 5000 {
		t.Fatalf("reopened: %+v", jst.guests["g1"])
	}
}

// An apply whose END failed (a full disk) is finished when the next epoch
// begins, after that epoch's BEGIN: the END closes the committed epoch's
// transaction, not the new one's, and the new epoch still commits.
func TestJournalLateApplyEndsItsOwnEpoch(t *testing.T) {
	j, _, err := openJournal(t.TempDir(), quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer j.close()
	persist := j.replicaPersist("g1")
	st := func(committed, applied uint64) checkpoint.ReplicaState {
		return checkpoint.ReplicaState{Generation: "gen1", Committed: committed, Applied: applied, Synced: true}
	}
	if err := j.epochBegin("g1", 1, "gen1", true); err != nil {
		t.Fatal(err)
	}
	if err := persist(st(1, 0)); err != nil {
		t.Fatal(err)
	}
	// Epoch 1's apply is not recorded (its END failed); epoch 2 begins.
	if err := j.epochBegin("g1", 2, "gen1", false); err != nil {
		t.Fatal(err)
	}
	if err := persist(st(1, 1)); err != nil {
		t.Fatalf("the late apply of epoch 1: %v", err)
	}
	if err := persist(st(2, 1)); err != nil {
		t.Fatalf("commit of epoch 2 after the late apply: %v", err)
	}
	if err := persist(st(2, 2)); err != nil {
		t.Fatalf("apply of epoch 2: %v", err)
	}
	if got, _ := j.state("g1"); got.Replica != st(2, 2) {
		t.Fatalf("journal state %+v", got.Replica)
	}
}

// A guest's history (`vm events`) is rebuilt from the records and from a
// checkpoint, outlives a drop, and stays bounded.
func TestJournalKeepsGuestHistory(t *testing.T) {
	dir := t.TempDir()
	j, _, err := openJournal(dir, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	j.note("g1", "enrolled", "standby on this host of primary host-a", 1)
	persist := j.replicaPersist("g1")
	for epoch := uint64(1); epoch <= checkpointEvery+2; epoch++ {
		if err := j.epochBegin("g1", epoch, "gen1", epoch == 1); err != nil {
			t.Fatal(err)
		}
		next := checkpoint.ReplicaState{Generation: "gen1", Committed: epoch, Applied: epoch - 1, Synced: true}
		if err := persist(next); err != nil {
			t.Fatal(err)
		}
		next.Applied = epoch
		if err := persist(next); err != nil {
			t.Fatal(err)
		}
	}
	j.checkpoint() // what a compaction keeps must carry the history
	j.note("g1", "state", "protected -> failing-over", 1)
	if err := j.append(context.Background(), true, txlog.TypePlain, 0, journalEvent{Kind: "promote", Guest: "g1", Fence: 2, Epoch: 7, Note: "the guest runs on this host"}); err != nil {
		t.Fatal(err)
	}
	if err := j.append(context.Background(), true, txlog.TypePlain, 0, journalEvent{Kind: "drop", Guest: "g1"}); err != nil {
		t.Fatal(err)
	}
	kinds := func(ev []api.Event) string {
		var k []string
		for _, e := range ev {
			k = append(k, e.Kind)
		}
		return strings.Join(k, ",")
	}
	const want = "enrolled,synced,state,promoted,dropped"
	before := j.events("g1")
	if got := kinds(before); got != want {
		t.Fatalf("events %s, want %s", got, want)
	}
	for _, e := range before {
		if e.Time.IsZero() {
			t.Fatalf("event %+v has no time", e)
		}
	}
	if p := before[3]; p.Fence != 2 || p.Epoch != 7 || p.Detail != "the guest runs on this host" {
		t.Fatalf("promotion event %+v", p)
	}
	if err := j.close(); err != nil {
		t.Fatal(err)
	}
	j2, st, err := openJournal(dir, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := st.guests["g1"]; ok {
		t.Fatal("a dropped guest's state came back")
	}
	after := j2.events("g1")
	if kinds(after) != want || !after[0].Time.Equal(before[0].Time) || !after[4].Time.Equal(before[4].Time) {
		t.Fatalf("after reopen: %+v\nbefore: %+v", after, before)
	}
	for i := 0; i < historyLen+10; i++ {
		j2.note("g1", "state", fmt.Sprintf("flap %d", i), 2)
	}
	if got := j2.events("g1"); len(got) != historyLen || got[len(got)-1].Detail != fmt.Sprintf("flap %d", historyLen+9) {
		t.Fatalf("%d events kept, last %+v", len(got), got[len(got)-1])
	}
	j2.close()
}

// A checkpoint written before history was kept (the guests map alone) is
// still read.
func TestJournalReadsAnOlderCheckpoint(t *testing.T) {
	var st journalState
	st.guests, st.history = map[string]journalGuest{}, map[string][]api.Event{}
	old := []byte(`{"g1":{"replica":{"generation":"gen1","committed":5,"applied":5,"synced":true},"fence":3}}`)
	if err := readCheckpoint(old, &st); err != nil {
		t.Fatal(err)
	}
	if g := st.guests["g1"]; g.Fence != 3 || g.Replica.Committed != 5 {
		t.Fatalf("read %+v", st.guests)
	}
	// A guest named "format" in the older form is not mistaken for the newer.
	old = []byte(`{"format":{"replica":{"committed":2},"fence":1}}`)
	st.guests = map[string]journalGuest{}
	if err := readCheckpoint(old, &st); err != nil || st.guests["format"].Fence != 1 {
		t.Fatalf("guest named format: %+v, %v", st.guests, err)
	}
}
