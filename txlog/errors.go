package txlog

import (
	"errors"
	"fmt"
)

// Sentinel errors; match them with errors.Is.
var (
	// ErrStaleEpoch: a record's fencing epoch is lower than the highest
	// epoch this log has accepted. The writer has been fenced off by a newer
	// primary and must stop.
	ErrStaleEpoch = errors.New("txlog: stale fencing epoch")
	// ErrTxnState: the record is not a legal next step for its transaction.
	ErrTxnState = errors.New("txlog: illegal transaction transition")
	// ErrInvalidRecord: the record is malformed (type, TxID, size).
	ErrInvalidRecord = errors.New("txlog: invalid record")
	// ErrClosed: the log was closed.
	ErrClosed = errors.New("txlog: log is closed")
	// ErrReadOnly: the log was opened with Options.ReadOnly.
	ErrReadOnly = errors.New("txlog: log is open read-only")
	// ErrCompacted: the requested LSN was removed by Compact.
	ErrCompacted = errors.New("txlog: LSN was compacted away")
	// ErrLocked: another process has the log open for writing.
	ErrLocked = errors.New("txlog: log directory is locked by another process")
	// ErrNoLog: the directory holds no log segments.
	ErrNoLog = errors.New("txlog: no log segments in directory")
	// ErrCorrupt: durable data is damaged. Errors carrying it are
	// *CorruptionError values that name the segment and offset.
	ErrCorrupt = errors.New("txlog: corrupt log")
)

// CorruptionError reports damage that recovery must not paper over: a bad
// record followed by data that was written after it was durable, a bad
// segment header, or a gap between segments.
type CorruptionError struct {
	Segment string // path of the segment file
	Offset  int64  // byte offset of the damage within the segment
	LSN     LSN    // LSN expected at Offset, 0 if not applicable
	Reason  string
}

func (e *CorruptionError) Error() string {
	lsn := ""
	if e.LSN != 0 {
		lsn = fmt.Sprintf(" (expected LSN %d)", e.LSN)
	}
	return fmt.Sprintf("txlog: corrupt log: segment %s offset %d%s: %s; "+
		"refusing to skip durable records: restore the log from a replica, or inspect it with 'remora txlog dump' and move the damaged segment aside by hand",
		e.Segment, e.Offset, lsn, e.Reason)
}

// Is makes errors.Is(err, ErrCorrupt) true.
func (e *CorruptionError) Is(target error) bool { return target == ErrCorrupt }
