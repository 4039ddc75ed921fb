package checkpoint

import (
	"bufio"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ReplicaState is what the standby must remember about a replica across a
// restart of its agent.
type ReplicaState struct {
	Generation string `json:"generation"`
	Committed  uint64 `json:"committed"` // newest epoch whose contents are complete and verified
	Applied    uint64 `json:"applied"`   // newest epoch written into the shell's RAM
	Synced     bool   `json:"synced"`    // the RAM holds a whole checkpoint of the guest
	// Prefilled: the RAM was filled from a copy of the guest (this host's
	// own, superseded): a resync against its page hashes completes it.
	Prefilled bool `json:"prefilled,omitempty"`
}

// ErrNotConsistent means the replica holds no complete checkpoint yet.
var ErrNotConsistent = errors.New("the standby holds no complete checkpoint of this guest (initial sync not finished)")

// Replica stages epochs for one guest on the standby and applies an epoch
// only when all of it arrived intact. Files in dir (on tmpfs next to the
// shell's RAM) make a committed epoch redo-able after an agent crash.
type Replica struct {
	dir     string
	mem     []byte
	pages   uint64
	state   ReplicaState
	persist func(ReplicaState) error

	// staging of the epoch being received
	staging    bool
	gen        string
	epoch      uint64
	begin      EpochBegin
	stage      *os.File
	stageW     *bufio.Writer
	devstate   *os.File
	crc        uint32
	gotPages   uint64
	gotBatch   uint32
	gotDev     uint64
	devScratch []byte // decoded device state chunk
	devNew     []byte // the staged epoch's device state, whole

	// The last committed epoch's device state, the base of a delta.
	devBase      []byte
	devBaseEpoch uint64
	devBaseGen   string
	scratch      []byte
	LastApply    struct{ Pages uint64 }

	disks []DiskEpochs
}

// DiskEpochs is a replicated disk's per-epoch writes (package
// checkpoint/disk): staged into a redo file before an epoch commits,
// applied with its memory.
type DiskEpochs interface {
	Stage(epoch uint64, path string) error
	Apply(path string) error
}

// OpenReplica opens a replica whose shell RAM is mem. It finishes applying
// an epoch that was committed before a crash, and discards one that was not.
// disks are the guest's replicated disks, in the primary's order.
func OpenReplica(dir string, mem []byte, state ReplicaState, persist func(ReplicaState) error, disks ...DiskEpochs) (*Replica, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	r := &Replica{dir: dir, mem: mem, pages: uint64(len(mem) / PageSize), state: state, persist: persist, disks: disks}
	if err := r.recover(); err != nil {
		return nil, err
	}
	return r, nil
}

// State returns the replica's durable state.
func (r *Replica) State() ReplicaState { return r.state }

// DevStatePath is the device state of the applied epoch.
func (r *Replica) DevStatePath() string { return filepath.Join(r.dir, "devstate") }

func (r *Replica) commitPath(epoch uint64, kind string) string {
	return filepath.Join(r.dir, fmt.Sprintf("commit-%d.%s", epoch, kind))
}

func (r *Replica) recover() error {
	entries, err := os.ReadDir(r.dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, "stage.") {
			_ = os.Remove(filepath.Join(r.dir, name)) // never committed: presumed abort
			continue
		}
		if !strings.HasPrefix(name, "commit-") {
			continue
		}
		num, _, _ := strings.Cut(strings.TrimPrefix(name, "commit-"), ".")
		ep, err := strconv.ParseUint(num, 10, 64)
		if err != nil || ep != r.state.Committed || r.state.Applied >= r.state.Committed {
			_ = os.Remove(filepath.Join(r.dir, name))
		}
	}
	if r.state.Applied < r.state.Committed {
		return r.apply(r.state.Committed)
	}
	return nil
}

// Begin starts staging epoch of the primary's generation gen. Epoch
// numbers only grow on a replica, across primary generations too.
func (r *Replica) Begin(gen string, epoch uint64, b EpochBegin) error {
	r.Abort()
	if r.state.Applied < r.state.Committed {
		// An earlier apply failed: finish it before staging anything newer.
		if err := r.apply(r.state.Committed); err != nil {
			return err
		}
	}
	if epoch <= r.state.Committed {
		return fmt.Errorf("epoch %d is not newer than committed epoch %d", epoch, r.state.Committed)
	}
	switch {
	case b.Base && (!r.state.Synced && !r.state.Prefilled || r.state.Applied != r.state.Committed):
		return fmt.Errorf("epoch %d resyncs against the replica's RAM, but the replica holds no complete checkpoint: %w", epoch, ErrNotConsistent)
	case !b.Full && !b.Base && (!r.state.Synced || gen != r.state.Generation):
		return fmt.Errorf("epoch %d is incremental but the replica holds no full copy of generation %s: %w", epoch, gen, ErrNotConsistent)
	}
	if b.DevStateLen > MaxDevState {
		return fmt.Errorf("epoch %d declares %d bytes of device state: at most %d are accepted", epoch, b.DevStateLen, MaxDevState)
	}
	if b.DevStateBase != 0 && (r.devBase == nil || r.devBaseEpoch != b.DevStateBase || r.devBaseGen != gen) {
		return fmt.Errorf("epoch %d's device state is a delta against epoch %d of generation %s, which this replica does not hold (it holds epoch %d of %q): the primary sends it whole in its next session", epoch, b.DevStateBase, gen, r.devBaseEpoch, r.devBaseGen)
	}
	st, err := os.Create(filepath.Join(r.dir, "stage.pages"))
	if err != nil {
		return err
	}
	dev, err := os.Create(filepath.Join(r.dir, "stage.devstate"))
	if err != nil {
		st.Close()
		return err
	}
	r.staging, r.gen, r.epoch, r.begin = true, gen, epoch, b
	r.stage, r.stageW, r.devstate = st, bufio.NewWriterSize(st, 1<<20), dev
	r.crc, r.gotPages, r.gotBatch, r.gotDev = 0, 0, 0, 0
	r.devNew = r.devNew[:0]
	return nil
}

func (r *Replica) check(epoch uint64) error {
	if !r.staging {
		return fmt.Errorf("protocol error: epoch %d data without epoch-begin", epoch)
	}
	if epoch != r.epoch {
		return fmt.Errorf("protocol error: data for epoch %d while staging %d", epoch, r.epoch)
	}
	return nil
}

// AddPages stages one page batch after checking that it decodes.
func (r *Replica) AddPages(epoch uint64, batch []byte) error {
	if err := r.check(epoch); err != nil {
		return err
	}
	var n int
	var err error
	r.scratch, n, err = DecodeBatch(batch, r.pages, r.scratch, func(uint64, []byte) error { return nil })
	if err != nil {
		return fmt.Errorf("epoch %d: %w", epoch, err)
	}
	var l [4]byte
	binary.BigEndian.PutUint32(l[:], uint32(len(batch)))
	if _, err := r.stageW.Write(l[:]); err != nil {
		return err
	}
	if _, err := r.stageW.Write(batch); err != nil {
		return err
	}
	r.crc = crc32.Update(r.crc, castagnoli, batch)
	r.gotPages += uint64(n)
	r.gotBatch++
	return nil
}

// AddDevState stages a chunk of device state (a FrameDevState payload).
func (r *Replica) AddDevState(epoch uint64, chunk []byte) error {
	if err := r.check(epoch); err != nil {
		return err
	}
	return r.addDevState(chunk, chunk)
}

// AddDevStateLZ4 stages a compressed chunk of device state (a
// FrameDevStateLZ4 payload).
func (r *Replica) AddDevStateLZ4(epoch uint64, payload []byte) error {
	if err := r.check(epoch); err != nil {
		return err
	}
	chunk, err := DecodeDevStateLZ4(payload, r.devScratch)
	if err != nil {
		return fmt.Errorf("epoch %d: %w", epoch, err)
	}
	r.devScratch = chunk[:0]
	return r.addDevState(payload, chunk)
}

// addDevState stages chunk of the checked epoch; the epoch checksum covers
// the payload as sent.
func (r *Replica) addDevState(payload, chunk []byte) error {
	if r.gotDev+uint64(len(chunk)) > r.begin.DevStateLen {
		r.Abort()
		return fmt.Errorf("%w: epoch %d sends more than the %d device-state bytes it declared", ErrIncomplete, r.epoch, r.begin.DevStateLen)
	}
	at := len(r.devNew)
	r.devNew = append(r.devNew, chunk...)
	if r.begin.DevStateBase != 0 {
		undelta(r.devNew[at:], r.devBase, at)
	}
	if _, err := r.devstate.Write(r.devNew[at:]); err != nil {
		return err
	}
	r.crc = crc32.Update(r.crc, castagnoli, payload)
	r.gotDev += uint64(len(chunk))
	return nil
}

// ErrIncomplete marks an epoch that did not arrive whole and intact; it is
// discarded and the previous epoch stays in place.
var ErrIncomplete = errors.New("epoch incomplete or corrupt")

// End verifies the staged epoch against its trailer, commits it, applies
// it to the shell's RAM and records it. After End returns nil the epoch may
// be acknowledged.
func (r *Replica) End(epoch uint64, end EpochEnd) error {
	if err := r.check(epoch); err != nil {
		return err
	}
	defer r.Abort()
	switch {
	case end.Pages != r.gotPages || end.Pages != r.begin.Pages:
		return fmt.Errorf("%w: epoch %d has %d pages, trailer says %d, header %d", ErrIncomplete, epoch, r.gotPages, end.Pages, r.begin.Pages)
	case end.Batches != r.gotBatch:
		return fmt.Errorf("%w: epoch %d has %d batches, trailer says %d", ErrIncomplete, epoch, r.gotBatch, end.Batches)
	case end.DevStateLen != r.gotDev || end.DevStateLen != r.begin.DevStateLen:
		return fmt.Errorf("%w: epoch %d has %d device-state bytes, trailer says %d", ErrIncomplete, epoch, r.gotDev, end.DevStateLen)
	case end.CRC != r.crc:
		return fmt.Errorf("%w: epoch %d checksum %08x, trailer says %08x", ErrIncomplete, epoch, r.crc, end.CRC)
	case crc32.Checksum(r.devNew, castagnoli) != end.DevStateCRC:
		return fmt.Errorf("%w: epoch %d's device state (rebuilt against epoch %d) has checksum %08x, the primary's %08x", ErrIncomplete, epoch, r.begin.DevStateBase, crc32.Checksum(r.devNew, castagnoli), end.DevStateCRC)
	case r.begin.Full && r.gotPages != r.pages:
		return fmt.Errorf("%w: full epoch %d has %d pages, guest RAM has %d", ErrIncomplete, epoch, r.gotPages, r.pages)
	}
	if err := r.stageW.Flush(); err != nil {
		return err
	}
	// Commit: the staged files become the redo record of this epoch.
	if err := os.Rename(r.stage.Name(), r.commitPath(epoch, "pages")); err != nil {
		return err
	}
	if err := os.Rename(r.devstate.Name(), r.commitPath(epoch, "devstate")); err != nil {
		return err
	}
	for i, d := range r.disks {
		if err := d.Stage(epoch, r.diskPath(epoch, i)); err != nil {
			return fmt.Errorf("stage disk writes of epoch %d: %w", epoch, err)
		}
	}
	next := r.state
	next.Committed = epoch
	next.Generation = r.gen
	if r.begin.Full || r.begin.Base {
		// A base epoch brought every page that differed from the RAM's
		// hashes: the RAM is the guest's at this cut.
		next.Synced, next.Prefilled = true, false
	}
	if err := r.persist(next); err != nil {
		return fmt.Errorf("record commit of epoch %d: %w", epoch, err)
	}
	r.state = next
	// This epoch's device state is the base of the next one's delta.
	r.devBase, r.devNew = r.devNew, r.devBase[:0]
	r.devBaseEpoch, r.devBaseGen = epoch, r.gen
	return r.apply(epoch)
}

// MaxDevState bounds one epoch's device state (the non-shared RAM blocks
// included; a VGA adds 16 MiB).
const MaxDevState = 256 << 20

// undelta turns delta, bytes at offset off of an epoch's device-state
// delta, into the device state, in place: XOR with base (zero past its
// end).
func undelta(delta, base []byte, off int) {
	if off >= len(base) {
		return
	}
	base = base[off:]
	n := min(len(delta), len(base))
	subtle.XORBytes(delta[:n], delta[:n], base[:n])
}

// deltaAgainst writes cur XOR base (zero past base's end) into dst, grown
// as needed, and returns it.
func deltaAgainst(dst, cur, base []byte) []byte {
	dst = append(dst[:0], cur...)
	n := min(len(cur), len(base))
	subtle.XORBytes(dst[:n], cur[:n], base[:n])
	return dst
}

// apply writes a committed epoch into the shell's RAM. It is idempotent, so
// a crash in the middle is repaired by applying again.
func (r *Replica) apply(epoch uint64) error {
	f, err := os.Open(r.commitPath(epoch, "pages"))
	if err != nil {
		return fmt.Errorf("committed epoch %d cannot be applied: %w", epoch, err)
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 1<<20)
	var total uint64
	var batch []byte
	for {
		var l [4]byte
		if _, err := io.ReadFull(br, l[:]); err == io.EOF {
			break
		} else if err != nil {
			return fmt.Errorf("read committed epoch %d: %w", epoch, err)
		}
		n := binary.BigEndian.Uint32(l[:])
		if cap(batch) < int(n) {
			batch = make([]byte, n)
		}
		batch = batch[:n]
		if _, err := io.ReadFull(br, batch); err != nil {
			return fmt.Errorf("read committed epoch %d: %w", epoch, err)
		}
		var cnt int
		r.scratch, cnt, err = DecodeBatch(batch, r.pages, r.scratch, func(i uint64, data []byte) error {
			dst := r.mem[i*PageSize : (i+1)*PageSize]
			if data == nil {
				clear(dst)
			} else {
				copy(dst, data)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("apply committed epoch %d: %w", epoch, err)
		}
		total += uint64(cnt)
	}
	// Disk writes of the epoch go to the replica images in the same step:
	// the redo files stay until the epoch is recorded as applied.
	for i, d := range r.disks {
		path := r.diskPath(epoch, i)
		if _, err := os.Stat(path); os.IsNotExist(err) {
			continue // applied before a crash, and removed
		}
		if err := d.Apply(path); err != nil {
			return fmt.Errorf("apply disk writes of epoch %d: %w", epoch, err)
		}
	}
	if err := os.Rename(r.commitPath(epoch, "devstate"), r.DevStatePath()); err != nil && !os.IsNotExist(err) {
		return err
	}
	next := r.state
	next.Applied = epoch
	if err := r.persist(next); err != nil {
		return fmt.Errorf("record apply of epoch %d: %w", epoch, err)
	}
	r.state = next
	r.LastApply.Pages = total
	_ = os.Remove(r.commitPath(epoch, "pages"))
	for i := range r.disks {
		_ = os.Remove(r.diskPath(epoch, i))
	}
	return nil
}

func (r *Replica) diskPath(epoch uint64, disk int) string {
	return r.commitPath(epoch, fmt.Sprintf("disk%d", disk))
}

// Abort discards a partly staged epoch.
func (r *Replica) Abort() {
	if !r.staging {
		return
	}
	r.staging = false
	for _, f := range []*os.File{r.stage, r.devstate} {
		name := f.Name()
		f.Close()
		if strings.Contains(filepath.Base(name), "stage.") {
			_ = os.Remove(name)
		}
	}
}

// Reset forgets every epoch: the next one must bring the whole guest, all
// of its pages or, when the RAM held a checkpoint (or a copy of the guest)
// with nothing half applied, every page that differs from its hashes.
func (r *Replica) Reset(generation string) error {
	r.Abort()
	next := ReplicaState{Generation: generation, Prefilled: (r.state.Synced || r.state.Prefilled) && r.state.Applied == r.state.Committed}
	if err := r.persist(next); err != nil {
		return err
	}
	r.state = next
	r.devBase, r.devBaseEpoch, r.devBaseGen = nil, 0, ""
	return nil
}

// MarkPrefilled records that the RAM was filled from a copy of the guest
// (its pages mostly right): the next primary resyncs against its hashes.
func (r *Replica) MarkPrefilled() error {
	next := r.state
	next.Prefilled = true
	if err := r.persist(next); err != nil {
		return err
	}
	r.state = next
	return nil
}

// PageHashes returns the hash of every page of the replica's RAM, for a
// primary of a new generation to resync against (Welcome.Hashes).
func (r *Replica) PageHashes() []uint64 { return PageHashes(r.mem) }

// Consistent reports whether the RAM holds a whole checkpoint and its
// device state is on hand.
func (r *Replica) Consistent() error {
	if !r.state.Synced || r.state.Applied == 0 || r.state.Applied != r.state.Committed {
		return ErrNotConsistent
	}
	if _, err := os.Stat(r.DevStatePath()); err != nil {
		return fmt.Errorf("device state of epoch %d missing: %w", r.state.Applied, err)
	}
	return nil
}
