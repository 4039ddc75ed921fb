// Package txlog is a durable write-ahead transaction log. A promoted
// standby opens it, learns which transactions committed (redo them), which
// aborted and which are in doubt (prepared, no decision), and resolves the
// rest by appending COMMIT or ABORT.
//
// # Usage
//
//	l, rec, err := txlog.Open(dir, txlog.Options{MinFencingEpoch: epoch})
//	for id, t := range rec.Txns { ... } // TxnCommitted: redo t.Data; TxnInDoubt: decide
//	lsn, err := l.Append(ctx, txlog.Record{Type: txlog.TypeCommit, Epoch: epoch, TxID: id})
//	l.Checkpoint(ctx, epoch, snapshot) // then l.Compact(ctx) drops covered segments
//
// Append returns once the record is durable; concurrent appenders share one
// fdatasync (group commit). AppendAsync returns at once and the record may
// be lost, which presumed abort makes harmless for BEGIN and DATA.
//
// # Transactions
//
// BEGIN starts a transaction, DATA carries its payload, PREPARE makes it
// in doubt, COMMIT or ABORT decides it and END says it is applied and its
// records are no longer needed. The log rejects illegal steps with
// ErrTxnState. Recovery reports every transaction as TxnCommitted,
// TxnAborted or TxnInDoubt; one with neither PREPARE nor a decision is
// aborted by presumption (TxnInfo.Presumed). Every record carries the
// writer's fencing epoch, and an epoch lower than the highest accepted is
// rejected with ErrStaleEpoch, so a fenced-off primary cannot write.
//
// # On-disk format
//
// A log is a directory of segment files named after their first LSN in
// hex, e.g. 0000000000000001.seg, preallocated to Options.SegmentSize
// (fallocate, or truncate where unsupported). Each starts with a 40-byte
// header: magic "RMRTXLOG", version, first LSN, fencing epoch, CRC32C.
// Records follow back to back, each a 44-byte header (CRC32C, payload
// length, type, LSN, epoch, transaction id, synced watermark) and the
// payload; all integers are little endian and the CRC (Castagnoli) covers
// everything after itself. The rest of a segment is zeros. A CHECKPOINT
// payload lists the live transactions followed by the caller's data.
//
// # Durability and recovery
//
// Segments are created under a temporary name, synced, renamed and the
// directory synced. Before the log moves to a new segment the old one is
// fdatasynced, so only the last segment can end in a torn write. Recovery
// reads records until the first one that is not valid. If only zeros
// follow, that is the normal end. Otherwise, in the last segment, the bad
// bytes are a torn tail unless a valid record after them has a synced
// watermark at or above the bad LSN: that record was written after the
// bad one was durable, so the damage is corruption, not a crash. A torn
// tail is copied to "<segment>.torn-<lsn>" and zeroed; corruption, a bad
// segment header or a gap between segments fails Open with a
// *CorruptionError naming the file and byte offset. Nothing is skipped.
//
// Recovery reads segments from the newest back to the latest checkpoint
// and the first record of any transaction that checkpoint still needs,
// not the whole history. Options.ReadOnly never modifies the directory
// (for inspection tools) and Options.VerifyAll checksums every segment.
package txlog
