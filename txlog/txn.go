package txlog

import (
	"encoding/binary"
	"fmt"
)

// TxnState is the state of a transaction.
type TxnState uint8

const (
	// TxnActive: begun, not prepared, no decision. Only seen in checkpoint
	// live sets; recovery reports such transactions as presumed aborted.
	TxnActive TxnState = 1
	// TxnInDoubt: prepared, no decision yet. The caller must COMMIT or
	// ABORT it.
	TxnInDoubt TxnState = 2
	// TxnCommitted: committed; redo its DATA records unless ended.
	TxnCommitted TxnState = 3
	// TxnAborted: aborted explicitly or by presumption.
	TxnAborted TxnState = 4
)

func (s TxnState) String() string {
	switch s {
	case TxnActive:
		return "active"
	case TxnInDoubt:
		return "in-doubt"
	case TxnCommitted:
		return "committed"
	case TxnAborted:
		return "aborted"
	}
	return fmt.Sprintf("TxnState(%d)", uint8(s))
}

// TxnInfo is what recovery knows about one transaction.
type TxnInfo struct {
	ID       uint64
	State    TxnState // TxnCommitted, TxnAborted or TxnInDoubt
	Presumed bool     // aborted only because no PREPARE or decision was logged
	Ended    bool     // an END record follows the decision
	FirstLSN LSN      // BEGIN (or first record seen)
	LastLSN  LSN      // last record of the transaction
	Epoch    uint64   // fencing epoch of the last record
	// Data holds the DATA records, in LSN order, of transactions that are
	// committed but not ended, or in doubt. Others carry nil.
	Data []Record
}

// LiveTxn is one entry of a checkpoint's live set: a transaction that may
// still need its records.
type LiveTxn struct {
	ID       uint64
	State    TxnState // TxnActive, TxnInDoubt or TxnCommitted
	FirstLSN LSN
}

// liveTxn tracks a transaction the running log has not forgotten.
type liveTxn struct {
	state TxnState
	first LSN
}

// checkTxn rejects transitions the log must never write. Anything it lets
// through, recovery classifies unambiguously.
func checkTxn(live map[uint64]*liveTxn, r *Record) error {
	switch r.Type {
	case TypePlain:
		return nil
	case TypeCheckpoint:
		return fmt.Errorf("%w: use Log.Checkpoint to write checkpoint records", ErrInvalidRecord)
	case TypeBegin, TypeData, TypePrepare, TypeCommit, TypeAbort, TypeEnd:
	default:
		return fmt.Errorf("%w: unknown record type %d", ErrInvalidRecord, r.Type)
	}
	if r.TxID == 0 {
		return fmt.Errorf("%w: %v record needs a non-zero TxID", ErrInvalidRecord, r.Type)
	}
	t := live[r.TxID]
	bad := func(what string) error {
		return fmt.Errorf("%w: %v for transaction %d: %s", ErrTxnState, r.Type, r.TxID, what)
	}
	switch r.Type {
	case TypeBegin:
		if t != nil {
			return bad(fmt.Sprintf("already %v (began at LSN %d); pick a new TxID", t.state, t.first))
		}
	case TypeData, TypePrepare:
		if t == nil {
			return bad("not in progress (never begun, already decided, or presumed aborted by recovery)")
		}
		if t.state != TxnActive {
			return bad(fmt.Sprintf("transaction is %v; DATA and PREPARE are only allowed while active", t.state))
		}
	case TypeCommit:
		if t == nil {
			return bad("not in progress (never begun, aborted, or presumed aborted by recovery)")
		}
		if t.state == TxnCommitted {
			return bad("already committed")
		}
	case TypeAbort:
		// Aborting an unknown transaction is a harmless no-op under presumed
		// abort, which lets a promoted standby abort everything it is unsure of.
		if t != nil && t.state == TxnCommitted {
			return bad("already committed; a committed transaction cannot be aborted")
		}
	case TypeEnd:
		if t != nil && t.state != TxnCommitted {
			return bad(fmt.Sprintf("transaction is %v; COMMIT or ABORT it before END", t.state))
		}
	}
	return nil
}

// applyLive updates the live set after r was accepted at lsn. Aborted and
// ended transactions are forgotten: they need no records.
func applyLive(live map[uint64]*liveTxn, r *Record, lsn LSN) {
	switch r.Type {
	case TypeBegin:
		live[r.TxID] = &liveTxn{state: TxnActive, first: lsn}
	case TypePrepare:
		live[r.TxID].state = TxnInDoubt
	case TypeCommit:
		live[r.TxID].state = TxnCommitted
	case TypeAbort, TypeEnd:
		delete(live, r.TxID)
	}
}

// txnTable classifies transactions during recovery. It is tolerant: the
// bytes passed CRC checks, so it makes the most conservative sense of any
// sequence rather than failing.
type txnTable map[uint64]*TxnInfo

func (tt txnTable) get(r *Record) *TxnInfo {
	t := tt[r.TxID]
	if t == nil {
		t = &TxnInfo{ID: r.TxID, State: TxnActive, FirstLSN: r.LSN}
		tt[r.TxID] = t
	}
	return t
}

func (tt txnTable) apply(r *Record) {
	switch r.Type {
	case TypePlain, TypeCheckpoint:
		return
	case TypeBegin:
		// A BEGIN starts a new incarnation even if the id was used before.
		tt[r.TxID] = &TxnInfo{ID: r.TxID, State: TxnActive, FirstLSN: r.LSN}
	case TypeEnd:
		if tt[r.TxID] == nil {
			return
		}
	}
	t := tt.get(r)
	t.LastLSN, t.Epoch = r.LSN, r.Epoch
	switch r.Type {
	case TypeData:
		if t.State == TxnActive {
			t.Data = append(t.Data, *r)
		}
	case TypePrepare:
		if t.State == TxnActive {
			t.State = TxnInDoubt
		}
	case TypeCommit:
		if t.State == TxnActive || t.State == TxnInDoubt {
			t.State = TxnCommitted
		}
	case TypeAbort:
		if t.State != TxnCommitted {
			t.State, t.Data = TxnAborted, nil
		}
	case TypeEnd:
		t.Ended = true
	}
}

// finish applies presumed abort and drops data nobody needs.
func (tt txnTable) finish() {
	for _, t := range tt {
		if t.State == TxnActive {
			t.State, t.Presumed = TxnAborted, true
		}
		if t.State == TxnAborted || t.Ended {
			t.Data = nil
		}
	}
}

// Checkpoint is a decoded CHECKPOINT record.
type Checkpoint struct {
	LSN   LSN
	Epoch uint64
	Live  []LiveTxn // transactions live when the checkpoint was written
	Data  []byte    // the caller's payload, e.g. a snapshot
}

// Checkpoint payload, little endian: u32 count, count x {u64 id, u8 state,
// u64 firstLSN}, then the caller's data.
const liveEntrySize = 17

func encodeCheckpoint(live []LiveTxn, data []byte) []byte {
	b := make([]byte, 4, 4+len(live)*liveEntrySize+len(data))
	binary.LittleEndian.PutUint32(b, uint32(len(live)))
	for _, t := range live {
		b = binary.LittleEndian.AppendUint64(b, t.ID)
		b = append(b, byte(t.State))
		b = binary.LittleEndian.AppendUint64(b, uint64(t.FirstLSN))
	}
	return append(b, data...)
}

// DecodeCheckpoint decodes a TypeCheckpoint record, e.g. one seen by
// Log.Iterate.
func DecodeCheckpoint(r Record) (*Checkpoint, error) {
	if r.Type != TypeCheckpoint {
		return nil, fmt.Errorf("%w: LSN %d is a %v record, not a checkpoint", ErrInvalidRecord, r.LSN, r.Type)
	}
	b := r.Payload
	bad := func(why string) error {
		return fmt.Errorf("%w: checkpoint at LSN %d: %s", ErrInvalidRecord, r.LSN, why)
	}
	if len(b) < 4 {
		return nil, bad("payload too short")
	}
	n := binary.LittleEndian.Uint32(b)
	b = b[4:]
	if uint64(n)*liveEntrySize > uint64(len(b)) {
		return nil, bad(fmt.Sprintf("claims %d live transactions but has %d bytes", n, len(b)))
	}
	c := &Checkpoint{LSN: r.LSN, Epoch: r.Epoch, Live: make([]LiveTxn, n)}
	for i := range c.Live {
		t := LiveTxn{
			ID:       binary.LittleEndian.Uint64(b),
			State:    TxnState(b[8]),
			FirstLSN: LSN(binary.LittleEndian.Uint64(b[9:])),
		}
		if t.State != TxnActive && t.State != TxnInDoubt && t.State != TxnCommitted {
			return nil, bad(fmt.Sprintf("live transaction %d has state %v", t.ID, t.State))
		}
		if t.FirstLSN == 0 || t.FirstLSN >= r.LSN {
			return nil, bad(fmt.Sprintf("live transaction %d starts at LSN %d", t.ID, t.FirstLSN))
		}
		c.Live[i] = t
		b = b[liveEntrySize:]
	}
	c.Data = b
	return c, nil
}
