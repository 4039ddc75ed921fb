package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/remora-ha/remora/migrate"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/txlog"
)

// The journal is the agent's write-ahead log (txlog): each replica epoch is
// a transaction (BEGIN on arrival, COMMIT once verified, END once applied,
// ABORT when incomplete), a failover is one transaction whose DATA records
// are its steps, and a promotion is recorded with its fencing epoch. On
// restart the replica states are rebuilt from the latest checkpoint plus
// the records after it.
type journal struct {
	log *txlog.Log
	lg  *slog.Logger
	dir string

	// mu orders appends: a record's LSN order is the order its event is
	// applied to guests, so a checkpoint of guests covers exactly the
	// records before it.
	mu        sync.Mutex
	nextTx    uint64
	epochTx   map[string]uint64 // guest -> transaction of the epoch being received
	commitTx  map[string]uint64 // guest -> transaction of its committed, not yet applied epoch
	fence     uint64            // highest fencing epoch written; txlog refuses lower ones
	sinceCkpt int
	guests    map[string]journalGuest
	history   map[string][]api.Event // per guest, newest last; outlives a drop
	// broken: a write or sync failed, so guests and the log's open
	// transactions may hold records that are not durable; the next use
	// reopens the log and rebuilds both from what is.
	broken bool
}

// journalEvent is the payload of every journal record.
type journalEvent struct {
	Kind  string `json:"k"` // epoch, failover, promote, reset, drop
	Guest string `json:"g"`
	Epoch uint64 `json:"e,omitempty"`
	Gen   string `json:"gen,omitempty"`
	Full  bool   `json:"full,omitempty"`
	Fence uint64 `json:"fence,omitempty"`
	Step  string `json:"step,omitempty"`
	// Time (Unix ns) and Note: what `vm events` shows of the record.
	Time int64  `json:"t,omitempty"`
	Note string `json:"note,omitempty"`
}

// journalGuest is a guest's state in a journal checkpoint.
type journalGuest struct {
	Replica checkpoint.ReplicaState `json:"replica"`
	Fence   uint64                  `json:"fence"`
}

// journalState is what the journal knew at open.
type journalState struct {
	guests    map[string]journalGuest
	commitTx  map[string]uint64  // committed, not yet applied epochs: their transactions
	failovers map[string]failTxn // failovers that were not ended
	history   map[string][]api.Event
}

// journalCheckpoint is a checkpoint's data. Before history was kept it was
// the guests map alone, which open still reads.
type journalCheckpoint struct {
	Format  int                     `json:"format"`
	Guests  map[string]journalGuest `json:"guests"`
	History map[string][]api.Event  `json:"history,omitempty"`
}

const checkpointFormat = 2

// historyLen bounds the events kept per guest.
const historyLen = 256

// failTxn is a failover the journal shows unfinished.
type failTxn struct {
	id        uint64
	committed bool
	steps     []string // its steps recorded as DATA, and "prepared" once that is durable
	fence     uint64
	epoch     uint64
}

// progress is how far the failover got, for migrate.Run.
func (t failTxn) progress() migrate.Progress {
	done := append([]string(nil), t.steps...)
	if t.committed {
		done = append(done, stepRestored)
	}
	return migrate.Progress{Tx: t.id, Done: done, Committed: t.committed}
}

const checkpointEvery = 256 // committed epochs between journal checkpoints

// journalSegmentSize is the size of a journal segment file (tests shrink it).
var journalSegmentSize int64 = 8 << 20

func openJournal(dir string, lg *slog.Logger) (*journal, journalState, error) {
	j := &journal{lg: lg, dir: filepath.Join(dir, "journal")}
	st, err := j.open()
	if err != nil {
		return nil, st, err
	}
	return j, st, nil
}

// open opens the log and rebuilds the guests' states from it (j.mu held,
// or before anyone else has j).
func (j *journal) open() (journalState, error) {
	st := journalState{guests: map[string]journalGuest{}, commitTx: map[string]uint64{}, failovers: map[string]failTxn{}, history: map[string][]api.Event{}}
	l, rec, err := txlog.Open(j.dir, txlog.Options{SegmentSize: journalSegmentSize})
	if err != nil {
		return st, fmt.Errorf("open the agent journal: %w (inspect it with `remora txlog verify %s`)", err, j.dir)
	}
	if rec.Torn != nil {
		j.lg.Warn("journal had a torn tail (a write cut by a crash); cut and kept aside", "file", rec.Torn.SavedAs, "bytes", rec.Torn.Bytes)
	}
	if rec.Checkpoint != nil && len(rec.Checkpoint.Data) > 0 {
		if err := readCheckpoint(rec.Checkpoint.Data, &st); err != nil {
			l.Close()
			return st, fmt.Errorf("journal checkpoint at LSN %d is unreadable: %w", rec.Checkpoint.LSN, err)
		}
	}
	var maxTx uint64
	for _, r := range rec.Records {
		maxTx = max(maxTx, r.TxID)
		var ev journalEvent
		if r.Type == txlog.TypeCheckpoint || json.Unmarshal(r.Payload, &ev) != nil {
			continue
		}
		applyEvent(st.guests, r.Type, ev)
		addHistory(st.history, r.Type, ev)
		if ev.Kind == "epoch" {
			switch r.Type {
			case txlog.TypeCommit:
				st.commitTx[ev.Guest] = r.TxID
			case txlog.TypeEnd:
				delete(st.commitTx, ev.Guest)
			}
		}
	}
	// A failover is prepared once its intent is durable; recovery finds it
	// in doubt and the agent decides: resume it, or roll it back.
	for id, t := range rec.Txns {
		maxTx = max(maxTx, id)
		if t.Ended || t.State == txlog.TxnAborted {
			continue
		}
		var ev journalEvent
		var steps []string
		for _, d := range t.Data {
			var s journalEvent
			if json.Unmarshal(d.Payload, &s) == nil {
				ev = s
				steps = append(steps, s.Step)
			}
		}
		if t.State == txlog.TxnInDoubt || t.State == txlog.TxnCommitted {
			steps = append(steps, stepPrepared)
		}
		if ev.Kind == "failover" {
			st.failovers[ev.Guest] = failTxn{id: id, committed: t.State == txlog.TxnCommitted, steps: steps, fence: ev.Fence, epoch: ev.Epoch}
		}
	}
	j.log, j.fence = l, max(j.fence, rec.MaxEpoch)
	j.nextTx = max(j.nextTx, maxTx+1, uint64(time.Now().UnixNano()))
	// An epoch being received keeps its transaction across a reopen: its
	// COMMIT goes through if its BEGIN was durable, and is refused if not.
	j.guests, j.commitTx = map[string]journalGuest{}, map[string]uint64{}
	if j.epochTx == nil {
		j.epochTx = map[string]uint64{}
	}
	for g, v := range st.guests {
		j.guests[g] = v
	}
	for g, tx := range st.commitTx {
		j.commitTx[g] = tx
	}
	j.history = map[string][]api.Event{}
	for g, h := range st.history {
		j.history[g] = h
	}
	return st, nil
}

func readCheckpoint(b []byte, st *journalState) error {
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(b, &probe); err != nil {
		return err
	}
	if string(probe["format"]) != strconv.Itoa(checkpointFormat) {
		return json.Unmarshal(b, &st.guests) // the older form
	}
	c := journalCheckpoint{Guests: st.guests, History: st.history}
	if err := json.Unmarshal(b, &c); err != nil {
		return err
	}
	if c.Guests != nil {
		st.guests = c.Guests
	}
	if c.History != nil {
		st.history = c.History
	}
	return nil
}

// addHistory keeps what an admin wants to read of a record: everything but
// the epochs, except the one that completed a full sync.
func addHistory(h map[string][]api.Event, typ txlog.RecordType, ev journalEvent) {
	var e api.Event
	switch {
	case ev.Kind == "epoch" && typ == txlog.TypeCommit && ev.Full:
		e = api.Event{Kind: "synced", Detail: "full sync complete; replica consistent"}
	case ev.Kind == "epoch":
		return
	case ev.Kind == "reset":
		e = api.Event{Kind: "reset", Detail: "replica discarded (a full sync follows)"}
	case ev.Kind == "drop":
		e = api.Event{Kind: "dropped", Detail: "no longer kept on this agent"}
	case ev.Kind == "promote":
		e = api.Event{Kind: "promoted", Detail: ev.Note}
	case typ == txlog.TypeBegin || typ == txlog.TypePrepare || typ == txlog.TypeCommit || typ == txlog.TypeData || typ == txlog.TypeAbort || typ == txlog.TypeEnd:
		e = api.Event{Kind: ev.Kind, Detail: moveDetail(typ, ev)}
	default:
		e = api.Event{Kind: ev.Kind, Detail: ev.Note}
	}
	e.Epoch, e.Fence = ev.Epoch, ev.Fence
	if ev.Time != 0 {
		e.Time = time.Unix(0, ev.Time).UTC()
	}
	l := append(h[ev.Guest], e)
	if len(l) > historyLen {
		l = append([]api.Event(nil), l[len(l)-historyLen:]...)
	}
	h[ev.Guest] = l
}

func moveDetail(typ txlog.RecordType, ev journalEvent) string {
	switch typ {
	case txlog.TypeBegin:
		return "begun"
	case txlog.TypeEnd:
		return "done"
	}
	return ev.Step
}

// reopen replaces a log that refuses writes (a failed write or fsync: a
// full or failing disk) with a fresh open of what is durable, so the agent
// recovers by itself once the disk does (j.mu held).
func (j *journal) reopen() error {
	_ = j.log.Close()
	if _, err := j.open(); err != nil {
		return err
	}
	j.lg.Warn("journal reopened after a write failure; records that were not durable are gone")
	return nil
}

// retryable reports whether err is the log's own failure (worth a reopen),
// not a refusal of the record.
func retryable(err error) bool {
	return err != nil && !errors.Is(err, txlog.ErrTxnState) && !errors.Is(err, txlog.ErrStaleEpoch) &&
		!errors.Is(err, txlog.ErrInvalidRecord) && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded)
}

// applyEvent folds one journal record into the guests' states.
func applyEvent(guests map[string]journalGuest, typ txlog.RecordType, ev journalEvent) {
	g := guests[ev.Guest]
	switch {
	case ev.Kind == "epoch" && typ == txlog.TypeCommit:
		g.Replica.Committed, g.Replica.Generation = ev.Epoch, ev.Gen
		if ev.Full {
			g.Replica.Synced = true
		}
	case ev.Kind == "epoch" && typ == txlog.TypeEnd:
		g.Replica.Applied = ev.Epoch
	case ev.Kind == "reset":
		g.Replica = checkpoint.ReplicaState{}
	case ev.Kind == "promote":
		g.Fence = max(g.Fence, ev.Fence)
	case ev.Kind == "drop":
		delete(guests, ev.Guest)
		return
	default:
		return
	}
	guests[ev.Guest] = g
}

func (j *journal) close() error { return j.log.Close() }

func (j *journal) newTx() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.nextTx++
	return j.nextTx
}

// heal reopens a broken log (j.mu held).
func (j *journal) heal() error {
	if !j.broken {
		return nil
	}
	if err := j.reopen(); err != nil {
		return err
	}
	j.broken = false
	return nil
}

func (j *journal) append(ctx context.Context, durable bool, typ txlog.RecordType, tx uint64, ev journalEvent) error {
	err := j.appendOnce(ctx, durable, typ, tx, ev)
	if retryable(err) {
		// The failure marked the log broken: the retry reopens it first.
		if err2 := j.appendOnce(ctx, durable, typ, tx, ev); err2 == nil {
			err = nil
		} else {
			err = fmt.Errorf("%w (after reopening the journal: %v)", err, err2)
		}
	}
	if err != nil {
		return fmt.Errorf("journal %s %s of %s: %w", typ, ev.Kind, ev.Guest, err)
	}
	return nil
}

func (j *journal) appendOnce(ctx context.Context, durable bool, typ txlog.RecordType, tx uint64, ev journalEvent) error {
	if ev.Time == 0 && (ev.Kind != "epoch" || ev.Full) {
		ev.Time = time.Now().UnixNano() // epochs go by too fast to be worth the bytes
	}
	b, _ := json.Marshal(ev)
	j.mu.Lock()
	if err := j.heal(); err != nil {
		j.mu.Unlock()
		return err
	}
	j.fence = max(j.fence, ev.Fence)
	_, err := j.log.AppendAsync(ctx, txlog.Record{Type: typ, Epoch: j.fence, TxID: tx, Payload: b})
	if err == nil {
		applyEvent(j.guests, typ, ev)
		addHistory(j.history, typ, ev)
	}
	l := j.log
	j.mu.Unlock()
	if err == nil && durable {
		err = l.Sync(ctx) // shared fdatasync with concurrent appenders
	}
	if retryable(err) {
		// The event is applied but may not be durable: a caller that
		// retries the same record must find it missing, not done.
		j.mu.Lock()
		j.broken = true
		j.mu.Unlock()
	}
	return err
}

// epochBegin records that an epoch started to arrive.
func (j *journal) epochBegin(guest string, epoch uint64, gen string, full bool) error {
	tx := j.newTx()
	j.mu.Lock()
	j.epochTx[guest] = tx
	j.mu.Unlock()
	return j.append(context.Background(), false, txlog.TypeBegin, tx, journalEvent{Kind: "epoch", Guest: guest, Epoch: epoch, Gen: gen, Full: full})
}

// replicaPersist is the Replica's persist hook for guest: a commit is made
// durable before the epoch is applied; the apply is recorded after.
func (j *journal) replicaPersist(guest string) func(checkpoint.ReplicaState) error {
	return func(next checkpoint.ReplicaState) error {
		j.mu.Lock()
		if err := j.heal(); err != nil {
			j.mu.Unlock()
			return fmt.Errorf("journal of %s: %w", guest, err)
		}
		prev := j.guests[guest].Replica
		tx := j.epochTx[guest]
		// An apply that failed is finished when the next epoch begins:
		// it ends the committed epoch's transaction, not the new one's.
		committedTx, ok := j.commitTx[guest]
		if !ok {
			committedTx = tx
		}
		j.mu.Unlock()
		ev := journalEvent{Kind: "epoch", Guest: guest, Gen: next.Generation}
		switch {
		case next.Committed > prev.Committed || next.Synced && !prev.Synced:
			ev.Epoch, ev.Full = next.Committed, next.Synced && !prev.Synced
			if err := j.append(context.Background(), true, txlog.TypeCommit, tx, ev); err != nil {
				return err
			}
			j.mu.Lock()
			j.commitTx[guest] = tx
			if j.epochTx[guest] == tx {
				delete(j.epochTx, guest)
			}
			j.mu.Unlock()
			return nil
		case next.Applied > prev.Applied:
			ev.Epoch = next.Applied
			if err := j.append(context.Background(), false, txlog.TypeEnd, committedTx, ev); err != nil {
				return err
			}
			j.mu.Lock()
			delete(j.commitTx, guest)
			j.sinceCkpt++
			due := j.sinceCkpt >= checkpointEvery
			j.mu.Unlock()
			if due {
				go j.checkpoint()
			}
			return nil
		case next.Committed == 0 && next.Applied == 0 && !next.Synced && (prev != next):
			return j.append(context.Background(), true, txlog.TypePlain, 0, journalEvent{Kind: "reset", Guest: guest})
		}
		return nil
	}
}

// state returns the journal's view of a guest.
func (j *journal) state(guest string) (journalGuest, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	g, ok := j.guests[guest]
	return g, ok
}

// epochAbort records that an epoch being received was discarded.
func (j *journal) epochAbort(guest string, epoch uint64) {
	j.mu.Lock()
	tx, ok := j.epochTx[guest]
	delete(j.epochTx, guest)
	j.mu.Unlock()
	if ok {
		_ = j.append(context.Background(), false, txlog.TypeAbort, tx, journalEvent{Kind: "epoch", Guest: guest, Epoch: epoch})
	}
}

// checkpoint writes the replica states and drops segments no longer
// needed. Appends wait meanwhile, so the snapshot matches the LSN.
func (j *journal) checkpoint() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	j.mu.Lock()
	if j.sinceCkpt < checkpointEvery {
		j.mu.Unlock()
		return
	}
	j.sinceCkpt = 0
	b, _ := json.Marshal(journalCheckpoint{Format: checkpointFormat, Guests: j.guests, History: j.history})
	_, err := j.log.Checkpoint(ctx, j.fence, b)
	j.mu.Unlock()
	if err != nil {
		j.lg.Warn("journal checkpoint failed", "err", err)
		return
	}
	if n, err := j.log.Compact(ctx); err != nil {
		j.lg.Warn("journal compaction failed", "err", err)
	} else if n > 0 {
		j.lg.Debug("journal compacted", "segments_removed", n)
	}
}

// moveJournal records a migrate.Move as one journal transaction: BEGIN,
// a record per step (DATA, PREPARE or COMMIT by the step's kind), END or
// ABORT.
type moveJournal struct{ j *journal }

func (mj moveJournal) event(m *migrate.Move, step string) journalEvent {
	return journalEvent{Kind: m.Kind, Guest: m.Guest, Epoch: m.Epoch, Fence: m.Fence, Step: step}
}

func (mj moveJournal) Begin(ctx context.Context, m *migrate.Move) (uint64, error) {
	tx := mj.j.newTx()
	return tx, mj.j.append(ctx, true, txlog.TypeBegin, tx, mj.event(m, ""))
}

func (mj moveJournal) Step(ctx context.Context, tx uint64, m *migrate.Move, s migrate.Step) error {
	switch s.Kind {
	case migrate.StepPrepare:
		return mj.j.append(ctx, true, txlog.TypePrepare, tx, mj.event(m, s.Name))
	case migrate.StepCommit:
		return mj.j.append(ctx, true, txlog.TypeCommit, tx, mj.event(m, s.Name))
	}
	return mj.j.append(ctx, false, txlog.TypeData, tx, mj.event(m, s.Name))
}

func (mj moveJournal) Abort(ctx context.Context, tx uint64, m *migrate.Move, why string) error {
	return mj.j.append(ctx, true, txlog.TypeAbort, tx, mj.event(m, "rolled back: "+why))
}

func (mj moveJournal) End(ctx context.Context, tx uint64, m *migrate.Move) error {
	return mj.j.append(ctx, false, txlog.TypeEnd, tx, mj.event(m, "announced"))
}

// note records an event of guest worth showing in `vm events` (not
// synced: the history is for people, and losing its last lines in a crash
// costs no data).
func (j *journal) note(guest, kind, note string, fence uint64) {
	if j == nil {
		return
	}
	if err := j.append(context.Background(), false, txlog.TypePlain, 0, journalEvent{Kind: kind, Guest: guest, Fence: fence, Note: note}); err != nil {
		j.lg.Warn("journal: event not recorded", "guest", guest, "event", kind, "err", err)
	}
}

// events returns guest's history, oldest first.
func (j *journal) events(guest string) []api.Event {
	j.mu.Lock()
	defer j.mu.Unlock()
	return append([]api.Event(nil), j.history[guest]...)
}

// journalDrop records that a guest is no longer kept here: its replica
// state and fencing epoch are forgotten with it.
func (a *Agent) journalDrop(ctx context.Context, name string) error {
	if a.journal == nil {
		return nil
	}
	return a.journal.append(ctx, true, txlog.TypePlain, 0, journalEvent{Kind: "drop", Guest: name})
}
