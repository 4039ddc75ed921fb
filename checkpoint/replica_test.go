package checkpoint

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// agentStore plays the standby agent's durable record of a replica: JSON
// written to a file atomically (temp file, fsync, rename).
type agentStore struct {
	path  string
	calls int
	// fail, when set, can refuse a persist call (numbered from 1).
	fail func(call int, st ReplicaState) error
}

func newAgentStore(t *testing.T) *agentStore {
	return &agentStore{path: filepath.Join(t.TempDir(), "replica.json")}
}

func (a *agentStore) persist(st ReplicaState) error {
	a.calls++
	if a.fail != nil {
		if err := a.fail(a.calls, st); err != nil {
			return err
		}
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := a.path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, a.path)
}

func (a *agentStore) load(t *testing.T) ReplicaState {
	t.Helper()
	b, err := os.ReadFile(a.path)
	if errors.Is(err, os.ErrNotExist) {
		return ReplicaState{}
	}
	if err != nil {
		t.Fatal(err)
	}
	var st ReplicaState
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// builtEpoch is an epoch as the primary's sendEpoch puts it on the wire.
type builtEpoch struct {
	begin    EpochBegin
	batches  [][]byte
	dev      [][]byte    // device state payloads as sent
	devTypes []FrameType // FrameDevState or FrameDevStateLZ4
	end      EpochEnd
}

// addDev hands device state payload i to the replica as the standby's
// receive loop does.
func (e builtEpoch) addDev(r *Replica, epoch uint64, i int) error {
	if e.devTypes[i] == FrameDevStateLZ4 {
		return r.AddDevStateLZ4(epoch, e.dev[i])
	}
	return r.AddDevState(epoch, e.dev[i])
}

// buildEpoch encodes the pages of src listed in indices (every page when
// nil) in batches of at most perBatch pages, splits devstate into 1 MiB
// chunks, and computes the trailer exactly as sendEpoch does.
func buildEpoch(t testing.TB, src []byte, indices []uint64, full bool, devstate []byte, perBatch int) builtEpoch {
	t.Helper()
	if indices == nil {
		for i := range uint64(len(src) / PageSize) {
			indices = append(indices, i)
		}
	}
	table := crc32.MakeTable(crc32.Castagnoli)
	var e builtEpoch
	var enc BatchEncoder
	crc := uint32(0)
	for off := 0; off < len(indices); off += perBatch {
		var pages []Page
		for _, i := range indices[off:min(off+perBatch, len(indices))] {
			pages = append(pages, Page{Index: i, Data: src[i*PageSize : (i+1)*PageSize]})
		}
		b, err := enc.EncodeBatch(nil, pages)
		if err != nil {
			t.Fatal(err)
		}
		crc = crc32.Update(crc, table, b)
		e.batches = append(e.batches, b)
	}
	for off := 0; off < len(devstate); off += MaxDevStateChunk {
		payload, ft, err := enc.EncodeDevState(nil, devstate[off:min(off+MaxDevStateChunk, len(devstate))])
		if err != nil {
			t.Fatal(err)
		}
		crc = crc32.Update(crc, table, payload)
		e.dev = append(e.dev, payload)
		e.devTypes = append(e.devTypes, ft)
	}
	e.begin = EpochBegin{Full: full, Pages: uint64(len(indices)), DevStateLen: uint64(len(devstate))}
	e.end = EpochEnd{Pages: uint64(len(indices)), Batches: uint32(len(e.batches)), DevStateLen: uint64(len(devstate)), CRC: crc, DevStateCRC: crc32.Checksum(devstate, table)}
	return e
}

// feed hands an epoch to the replica as the standby's receive loop does.
func feed(r *Replica, gen string, epoch uint64, e builtEpoch) error {
	if err := r.Begin(gen, epoch, e.begin); err != nil {
		return err
	}
	for _, b := range e.batches {
		if err := r.AddPages(epoch, b); err != nil {
			return err
		}
	}
	for i := range e.dev {
		if err := e.addDev(r, epoch, i); err != nil {
			return err
		}
	}
	// The trailer goes through its wire form.
	end, err := UnmarshalEpochEnd(e.end.Marshal())
	if err != nil {
		return err
	}
	return r.End(epoch, end)
}

// guest is a source of RAM contents that changes between epochs.
type guest struct {
	r   *rand.Rand
	mem []byte
}

func newGuest(seed uint64, pages int) *guest {
	g := &guest{r: newRand(seed), mem: make([]byte, pages*PageSize)}
	for p := range pages {
		switch p % 4 {
		case 0: // zero
		case 1:
			fillText(g.r, g.page(p))
		case 2:
			fillRandom(g.r, g.page(p))
		case 3:
			g.page(p)[p%PageSize] = byte(p)
		}
	}
	return g
}

func (g *guest) page(p int) []byte { return g.mem[p*PageSize : (p+1)*PageSize] }

// write changes n random pages (some to zero, some from zero) and returns
// the sorted indices it touched.
func (g *guest) write(n int) []uint64 {
	set := map[uint64]bool{}
	pages := len(g.mem) / PageSize
	for range n {
		p := g.r.IntN(pages)
		switch g.r.IntN(3) {
		case 0:
			clear(g.page(p))
		case 1:
			fillRandom(g.r, g.page(p))
		case 2:
			g.page(p)[g.r.IntN(PageSize)]++
		}
		set[uint64(p)] = true
	}
	out := make([]uint64, 0, len(set))
	for p := range set {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

func devstateFor(epoch uint64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(uint64(i)*31 + epoch*7 + uint64(i>>8))
	}
	return b
}

// replicaFixture is a standby replica of a guest.
type replicaFixture struct {
	disks []DiskEpochs
	t     *testing.T
	dir   string
	ram   []byte
	store *agentStore
	r     *Replica
	g     *guest
	gen   string
	epoch uint64
	dev   []byte // devstate of the applied epoch
}

const fixturePages = 256 // 1 MiB

func newReplicaFixture(t *testing.T, disks ...DiskEpochs) *replicaFixture {
	f := &replicaFixture{t: t, dir: filepath.Join(t.TempDir(), "replica"), store: newAgentStore(t), gen: "gen-a", disks: disks}
	f.ram = make([]byte, fixturePages*PageSize)
	fillRandom(newRand(77), f.ram) // the shell's RAM starts as garbage
	f.g = newGuest(1, fixturePages)
	f.open(ReplicaState{})
	return f
}

func (f *replicaFixture) open(st ReplicaState) {
	f.t.Helper()
	r, err := OpenReplica(f.dir, f.ram, st, f.store.persist, f.disks...)
	if err != nil {
		f.t.Fatalf("OpenReplica: %v", err)
	}
	f.r = r
}

// full sends a full epoch of the guest's current RAM.
func (f *replicaFixture) full() {
	f.t.Helper()
	f.epoch++
	dev := devstateFor(f.epoch, 3000)
	if err := feed(f.r, f.gen, f.epoch, buildEpoch(f.t, f.g.mem, nil, true, dev, 100)); err != nil {
		f.t.Fatalf("full epoch %d: %v", f.epoch, err)
	}
	f.dev = dev
	f.check()
}

// incr lets the guest write n pages and sends them as an incremental epoch.
func (f *replicaFixture) incr(n int) {
	f.t.Helper()
	dirty := f.g.write(n)
	f.epoch++
	dev := devstateFor(f.epoch, 2500)
	if err := feed(f.r, f.gen, f.epoch, buildEpoch(f.t, f.g.mem, dirty, false, dev, 37)); err != nil {
		f.t.Fatalf("incremental epoch %d: %v", f.epoch, err)
	}
	if f.r.LastApply.Pages != uint64(len(dirty)) {
		f.t.Fatalf("LastApply.Pages = %d, want %d", f.r.LastApply.Pages, len(dirty))
	}
	f.dev = dev
	f.check()
}

// check asserts the replica holds the guest as of the last epoch.
func (f *replicaFixture) check() {
	f.t.Helper()
	if !bytes.Equal(f.ram, f.g.mem) {
		f.t.Fatalf("replica RAM differs from the guest after epoch %d (%d pages differ)", f.epoch, diffPages(f.ram, f.g.mem))
	}
	want := ReplicaState{Generation: f.gen, Committed: f.epoch, Applied: f.epoch, Synced: true}
	if st := f.r.State(); st != want {
		f.t.Fatalf("State() = %+v, want %+v", st, want)
	}
	if st := f.store.load(f.t); st != want {
		f.t.Fatalf("persisted state %+v, want %+v", st, want)
	}
	if err := f.r.Consistent(); err != nil {
		f.t.Fatalf("Consistent: %v", err)
	}
	if dev, err := os.ReadFile(f.r.DevStatePath()); err != nil || !bytes.Equal(dev, f.dev) {
		f.t.Fatalf("device state file: %v (equal=%v)", err, bytes.Equal(dev, f.dev))
	}
	f.checkNoLeftovers()
}

func (f *replicaFixture) checkNoLeftovers() {
	f.t.Helper()
	entries, err := os.ReadDir(f.dir)
	if err != nil {
		f.t.Fatal(err)
	}
	for _, e := range entries {
		if n := e.Name(); strings.HasPrefix(n, "stage.") || strings.HasPrefix(n, "commit-") {
			f.t.Fatalf("file %s left in the replica directory", n)
		}
	}
}

func diffPages(a, b []byte) int {
	n := 0
	for p := 0; p+PageSize <= min(len(a), len(b)); p += PageSize {
		if !bytes.Equal(a[p:p+PageSize], b[p:p+PageSize]) {
			n++
		}
	}
	return n
}

func TestReplicaFullThenIncrementalEpochs(t *testing.T) {
	f := newReplicaFixture(t)
	if err := f.r.Consistent(); !errors.Is(err, ErrNotConsistent) {
		t.Fatalf("Consistent before any epoch: %v, want ErrNotConsistent", err)
	}
	f.full()
	if f.r.LastApply.Pages != fixturePages {
		t.Fatalf("LastApply.Pages = %d after a full epoch", f.r.LastApply.Pages)
	}
	for _, n := range []int{1, 10, 300, 0, 2000} {
		f.incr(n)
	}
	// A large device state travels in several chunks.
	f.epoch++
	dev := devstateFor(f.epoch, 2<<20+123)
	e := buildEpoch(t, f.g.mem, f.g.write(5), false, dev, 1000)
	if len(e.dev) != 3 {
		t.Fatalf("test setup: %d devstate chunks", len(e.dev))
	}
	if err := feed(f.r, f.gen, f.epoch, e); err != nil {
		t.Fatal(err)
	}
	f.dev = dev
	f.check()
	// Full epochs may also follow incremental ones (a resync).
	f.g.write(50)
	f.full()
	f.incr(7)
}

func TestReplicaConsistentNeedsDevState(t *testing.T) {
	f := newReplicaFixture(t)
	f.full()
	if err := os.Remove(f.r.DevStatePath()); err != nil {
		t.Fatal(err)
	}
	if err := f.r.Consistent(); err == nil {
		t.Fatal("Consistent with the device state file gone")
	}
}

// A broken epoch is refused, and nothing of it reaches the RAM, the
// durable state or the device state; the same epoch then goes through.
func TestReplicaRefusesBrokenEpochs(t *testing.T) {
	type run func(r *Replica, gen string, epoch uint64, e builtEpoch) error
	plain := func(mut func(*builtEpoch)) run {
		return func(r *Replica, gen string, epoch uint64, e builtEpoch) error {
			e.batches = slices.Clone(e.batches)
			e.dev = slices.Clone(e.dev)
			e.devTypes = slices.Clone(e.devTypes)
			mut(&e)
			return feed(r, gen, epoch, e)
		}
	}
	flipByte := func(b []byte, i int) []byte {
		b = bytes.Clone(b)
		b[i] ^= 0x20
		return b
	}
	cases := []struct {
		name       string
		run        run
		incomplete bool // the error must be ErrIncomplete
	}{
		{"missing batch", plain(func(e *builtEpoch) { e.batches = slices.Delete(e.batches, 1, 2) }), true},
		{"missing last batch", plain(func(e *builtEpoch) { e.batches = e.batches[:len(e.batches)-1] }), true},
		{"batch twice", plain(func(e *builtEpoch) { e.batches = append(e.batches, e.batches[0]) }), true},
		{"batches reordered", plain(func(e *builtEpoch) { e.batches[0], e.batches[1] = e.batches[1], e.batches[0] }), true},
		{"trailer page count", plain(func(e *builtEpoch) { e.end.Pages++ }), true},
		{"header page count", plain(func(e *builtEpoch) { e.begin.Pages-- }), true},
		{"trailer batch count", plain(func(e *builtEpoch) { e.end.Batches-- }), true},
		{"wrong crc", plain(func(e *builtEpoch) { e.end.CRC ^= 1 }), true},
		{"page data changed", plain(func(e *builtEpoch) {
			b := e.batches[0]
			e.batches[0] = flipByte(b, len(b)-10) // inside the page data
		}), true},
		{"devstate length in trailer", plain(func(e *builtEpoch) { e.end.DevStateLen++ }), true},
		{"devstate length in header", plain(func(e *builtEpoch) { e.begin.DevStateLen-- }), true},
		{"devstate chunk missing", plain(func(e *builtEpoch) { e.dev = nil }), true},
		{"devstate chunk short", plain(func(e *builtEpoch) {
			e.dev[0], e.devTypes[0] = devstateFor(0, int(e.begin.DevStateLen)-1), FrameDevState
		}), true},
		// The last bytes of an lz4 block are literals: it still decodes.
		{"devstate changed", plain(func(e *builtEpoch) { e.dev[0] = flipByte(e.dev[0], len(e.dev[0])-1) }), true},
		{"devstate twice", plain(func(e *builtEpoch) {
			e.dev, e.devTypes = append(e.dev, e.dev[0]), append(e.devTypes, e.devTypes[0])
		}), true},
		{"compressed devstate truncated", func(r *Replica, gen string, epoch uint64, e builtEpoch) error {
			if e.devTypes[0] != FrameDevStateLZ4 {
				return fmt.Errorf("test setup: device state sent as %v, want %v", e.devTypes[0], FrameDevStateLZ4)
			}
			e.dev = slices.Clone(e.dev)
			e.dev[0] = e.dev[0][:len(e.dev[0])-3]
			err := feed(r, gen, epoch, e)
			r.Abort() // the standby drops the session
			if !errors.Is(err, ErrBadDevState) {
				return fmt.Errorf("truncated lz4 device state: %v, want ErrBadDevState", err)
			}
			return err
		}, false},
		{"pages for another epoch", func(r *Replica, gen string, epoch uint64, e builtEpoch) error {
			if err := r.Begin(gen, epoch, e.begin); err != nil {
				return err
			}
			err := r.AddPages(epoch+1, e.batches[0])
			if err == nil {
				return errors.New("pages of another epoch accepted")
			}
			// The standby may carry on to the trailer: it must not commit.
			for _, b := range e.batches[1:] {
				if err := r.AddPages(epoch, b); err != nil {
					return err
				}
			}
			for i := range e.dev {
				if err := e.addDev(r, epoch, i); err != nil {
					return err
				}
			}
			if err := r.End(epoch, e.end); !errors.Is(err, ErrIncomplete) {
				return fmt.Errorf("End after a foreign batch: %v, want ErrIncomplete", err)
			}
			return ErrIncomplete
		}, true},
		{"devstate for an older epoch", func(r *Replica, gen string, epoch uint64, e builtEpoch) error {
			if err := r.Begin(gen, epoch, e.begin); err != nil {
				return err
			}
			for _, b := range e.batches {
				if err := r.AddPages(epoch, b); err != nil {
					return err
				}
			}
			if err := e.addDev(r, epoch-1, 0); err == nil {
				return errors.New("devstate of another epoch accepted")
			}
			return r.End(epoch, e.end)
		}, true},
		{"trailer for another epoch", func(r *Replica, gen string, epoch uint64, e builtEpoch) error {
			if err := r.Begin(gen, epoch, e.begin); err != nil {
				return err
			}
			for _, b := range e.batches {
				if err := r.AddPages(epoch, b); err != nil {
					return err
				}
			}
			for i := range e.dev {
				if err := e.addDev(r, epoch, i); err != nil {
					return err
				}
			}
			err := r.End(epoch+1, e.end)
			r.Abort() // the standby drops the session on a protocol error
			if err == nil {
				return errors.New("trailer of another epoch accepted")
			}
			return err
		}, false},
		{"data without begin", func(r *Replica, gen string, epoch uint64, e builtEpoch) error {
			if err := r.AddPages(epoch, e.batches[0]); err == nil {
				return errors.New("pages without epoch-begin accepted")
			}
			if err := e.addDev(r, epoch, 0); err == nil {
				return errors.New("devstate without epoch-begin accepted")
			}
			if err := r.End(epoch, e.end); err == nil {
				return errors.New("epoch-end without epoch-begin accepted")
			}
			return errors.New("refused")
		}, false},
		{"corrupt batch", func(r *Replica, gen string, epoch uint64, e builtEpoch) error {
			if err := r.Begin(gen, epoch, e.begin); err != nil {
				return err
			}
			if err := r.AddPages(epoch, e.batches[0][:len(e.batches[0])-1]); !errors.Is(err, ErrBadBatch) {
				return fmt.Errorf("truncated batch: %v, want ErrBadBatch", err)
			}
			if err := r.AddPages(epoch, []byte{0, 0, 0, 1, 0, 7, 0}); !errors.Is(err, ErrBadBatch) {
				return fmt.Errorf("bad page kind: %v, want ErrBadBatch", err)
			}
			return r.End(epoch, e.end)
		}, true},
		{"page beyond RAM", func(r *Replica, gen string, epoch uint64, e builtEpoch) error {
			if err := r.Begin(gen, epoch, e.begin); err != nil {
				return err
			}
			var enc BatchEncoder
			b, _ := enc.EncodeBatch(nil, []Page{{Index: fixturePages, Data: bytes.Repeat([]byte{1}, PageSize)}})
			if err := r.AddPages(epoch, b); !errors.Is(err, ErrBadBatch) {
				return fmt.Errorf("page beyond RAM: %v, want ErrBadBatch", err)
			}
			r.Abort() // the standby drops the session
			return errors.New("refused")
		}, false},
		{"aborted", func(r *Replica, gen string, epoch uint64, e builtEpoch) error {
			if err := r.Begin(gen, epoch, e.begin); err != nil {
				return err
			}
			if err := r.AddPages(epoch, e.batches[0]); err != nil {
				return err
			}
			if err := e.addDev(r, epoch, 0); err != nil {
				return err
			}
			r.Abort()
			r.Abort() // twice is harmless
			if err := r.End(epoch, e.end); err == nil {
				return errors.New("End after Abort succeeded")
			}
			return errors.New("aborted")
		}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := newReplicaFixture(t)
			f.full()
			f.incr(40)
			before := ReplicaState{Generation: f.gen, Committed: f.epoch, Applied: f.epoch, Synced: true}
			ramBefore := bytes.Clone(f.ram)
			dirty := f.g.write(300)
			next := f.epoch + 1
			dev := devstateFor(next, 5000)
			e := buildEpoch(t, f.g.mem, dirty, false, dev, 50)
			if len(e.batches) < 3 {
				t.Fatalf("test setup: %d batches", len(e.batches))
			}
			err := c.run(f.r, f.gen, next, e)
			if err == nil {
				t.Fatal("broken epoch accepted")
			}
			if c.incomplete && !errors.Is(err, ErrIncomplete) {
				t.Fatalf("error %v, want ErrIncomplete", err)
			}
			if !bytes.Equal(f.ram, ramBefore) {
				t.Fatalf("a refused epoch changed %d pages of the replica RAM", diffPages(f.ram, ramBefore))
			}
			if st := f.r.State(); st != before {
				t.Fatalf("State() = %+v after a refused epoch, want %+v", st, before)
			}
			if st := f.store.load(t); st != before {
				t.Fatalf("persisted %+v after a refused epoch, want %+v", st, before)
			}
			if err := f.r.Consistent(); err != nil {
				t.Fatalf("previous epoch no longer consistent: %v", err)
			}
			if got, _ := os.ReadFile(f.r.DevStatePath()); !bytes.Equal(got, f.dev) {
				t.Fatal("a refused epoch replaced the device state")
			}
			f.checkNoLeftovers()
			// The primary resends: the same epoch now goes through.
			if err := feed(f.r, f.gen, next, e); err != nil {
				t.Fatalf("resent epoch: %v", err)
			}
			f.epoch, f.dev = next, dev
			f.check()
		})
	}
}

func TestReplicaFullEpochMustCoverAllRAM(t *testing.T) {
	f := newReplicaFixture(t)
	half := make([]uint64, fixturePages/2)
	for i := range half {
		half[i] = uint64(i)
	}
	e := buildEpoch(t, f.g.mem, half, true, devstateFor(1, 100), 100)
	if err := feed(f.r, f.gen, 1, e); !errors.Is(err, ErrIncomplete) {
		t.Fatalf("full epoch with half the pages: %v, want ErrIncomplete", err)
	}
	if st := f.r.State(); st != (ReplicaState{}) {
		t.Fatalf("state %+v after a refused full epoch", st)
	}
	if err := f.r.Consistent(); !errors.Is(err, ErrNotConsistent) {
		t.Fatalf("Consistent: %v", err)
	}
	f.checkNoLeftovers()
}

func TestReplicaIncrementalNeedsAFullCopy(t *testing.T) {
	f := newReplicaFixture(t)
	ramBefore := bytes.Clone(f.ram)
	e := buildEpoch(t, f.g.mem, []uint64{1, 2, 3}, false, devstateFor(1, 10), 10)
	if err := feed(f.r, f.gen, 1, e); !errors.Is(err, ErrNotConsistent) {
		t.Fatalf("incremental epoch before any full one: %v, want ErrNotConsistent", err)
	}
	if !bytes.Equal(f.ram, ramBefore) || f.r.State() != (ReplicaState{}) || f.store.calls != 0 {
		t.Fatal("a refused incremental epoch changed the replica")
	}
	f.checkNoLeftovers()

	f.full()
	f.incr(3)
	// An incremental epoch of another primary generation is refused: its
	// pages are relative to RAM this replica never had.
	e = buildEpoch(t, f.g.mem, f.g.write(2), false, devstateFor(9, 10), 10)
	if err := feed(f.r, "gen-b", f.epoch+1, e); !errors.Is(err, ErrNotConsistent) {
		t.Fatalf("incremental epoch of another generation: %v, want ErrNotConsistent", err)
	}
	// A full epoch of the new generation is accepted; then its increments.
	f.gen = "gen-b"
	f.full()
	f.incr(20)
	// And now the old generation's increments are refused.
	e = buildEpoch(t, f.g.mem, f.g.write(2), false, devstateFor(9, 10), 10)
	if err := feed(f.r, "gen-a", f.epoch+1, e); !errors.Is(err, ErrNotConsistent) {
		t.Fatalf("incremental epoch of the old generation: %v, want ErrNotConsistent", err)
	}
	f.checkNoLeftovers()
}

func TestReplicaEpochMustBeNewer(t *testing.T) {
	f := newReplicaFixture(t)
	f.full()
	f.incr(5)
	f.incr(5)
	committed := f.epoch
	ramBefore := bytes.Clone(f.ram)
	for _, ep := range []uint64{0, 1, committed - 1, committed} {
		for _, full := range []bool{false, true} {
			for _, gen := range []string{f.gen, "gen-other"} {
				if err := f.r.Begin(gen, ep, EpochBegin{Full: full, Pages: 1}); err == nil {
					t.Fatalf("Begin(%s, epoch %d, full=%v) accepted with %d committed", gen, ep, full, committed)
				}
			}
		}
	}
	if !bytes.Equal(f.ram, ramBefore) || f.r.State().Committed != committed {
		t.Fatal("refused Begin changed the replica")
	}
	f.checkNoLeftovers()
	f.incr(5) // committed+1 is fine
}

func TestReplicaEpochNumbersMayJump(t *testing.T) {
	f := newReplicaFixture(t)
	f.full()
	f.epoch += 100 // epochs the standby never saw (a primary restart, a lost session)
	f.incr(8)
}

// The agent crashes after recording the commit of an epoch but before
// recording its apply (the second persist call of End fails). The shell's
// RAM holds anything between the previous and this epoch. Reopening with
// the persisted state must redo the apply.
func TestReplicaCrashBetweenCommitAndApplyRecords(t *testing.T) {
	for _, ramAtCrash := range []string{"as before", "half applied", "fully applied", "garbage in written pages"} {
		t.Run(ramAtCrash, func(t *testing.T) {
			t.Parallel()
			f := newReplicaFixture(t)
			f.full()
			f.incr(30)
			prevRAM := bytes.Clone(f.ram)
			prevState := f.r.State()

			dirty := f.g.write(200)
			next := f.epoch + 1
			dev := devstateFor(next, 4000)
			e := buildEpoch(t, f.g.mem, dirty, false, dev, 60)
			crash := errors.New("agent killed")
			first := f.store.calls + 1
			f.store.fail = func(call int, st ReplicaState) error {
				if call == first+1 {
					return crash
				}
				return nil
			}
			err := feed(f.r, f.gen, next, e)
			if !errors.Is(err, crash) {
				t.Fatalf("End with the apply record failing: %v", err)
			}
			f.store.fail = nil
			persisted := f.store.load(t)
			want := ReplicaState{Generation: f.gen, Committed: next, Applied: prevState.Applied, Synced: true}
			if persisted != want {
				t.Fatalf("persisted %+v, want %+v", persisted, want)
			}
			if _, err := os.Stat(f.r.commitPath(next, "pages")); err != nil {
				t.Fatalf("commit record of epoch %d missing: %v", next, err)
			}

			// The agent process is gone; the shell's RAM survived in some
			// state between the two epochs.
			switch ramAtCrash {
			case "as before":
				copy(f.ram, prevRAM)
			case "half applied":
				copy(f.ram, prevRAM)
				for _, p := range dirty[:len(dirty)/2] {
					copy(f.ram[p*PageSize:(p+1)*PageSize], f.g.page(int(p)))
				}
			case "fully applied":
			case "garbage in written pages":
				for _, p := range dirty {
					fillRandom(newRand(p), f.ram[p*PageSize:(p+1)*PageSize])
				}
			}
			f.open(persisted)
			f.epoch, f.dev = next, dev
			f.check()
			if f.r.LastApply.Pages != uint64(len(dirty)) {
				t.Fatalf("recovery applied %d pages, want %d", f.r.LastApply.Pages, len(dirty))
			}
			// Replication carries on.
			f.incr(10)
		})
	}
}

// The agent crashes after the staged files became the commit record but
// before the commit was recorded: the epoch was never acknowledged, so it
// is discarded on reopen and the previous one stays.
func TestReplicaCrashBeforeCommitRecord(t *testing.T) {
	f := newReplicaFixture(t)
	f.full()
	f.incr(30)
	prevRAM := bytes.Clone(f.ram)
	prevState := f.r.State()
	prevDev := f.dev

	next := f.epoch + 1
	e := buildEpoch(t, f.g.mem, f.g.write(100), false, devstateFor(next, 1000), 60)
	crash := errors.New("agent killed")
	first := f.store.calls + 1
	f.store.fail = func(call int, st ReplicaState) error {
		if call == first {
			return crash
		}
		return nil
	}
	if err := feed(f.r, f.gen, next, e); !errors.Is(err, crash) {
		t.Fatalf("End with the commit record failing: %v", err)
	}
	f.store.fail = nil
	if !bytes.Equal(f.ram, prevRAM) || f.r.State() != prevState || f.store.load(t) != prevState {
		t.Fatal("an epoch whose commit was not recorded changed the replica")
	}
	f.open(f.store.load(t))
	f.checkNoLeftovers()
	if !bytes.Equal(f.ram, prevRAM) || f.r.State() != prevState {
		t.Fatal("reopen changed the replica")
	}
	if err := f.r.Consistent(); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(f.r.DevStatePath()); !bytes.Equal(got, prevDev) {
		t.Fatal("device state of the kept epoch replaced")
	}
	// The primary never got an ack and resends the epoch.
	if err := feed(f.r, f.gen, next, e); err != nil {
		t.Fatal(err)
	}
	f.epoch, f.dev = next, devstateFor(next, 1000)
	f.check()
}

// Without a reopen, the standby may simply receive the same epoch again
// after a failed commit record.
func TestReplicaRetryAfterFailedCommitRecord(t *testing.T) {
	f := newReplicaFixture(t)
	f.full()
	next := f.epoch + 1
	dev := devstateFor(next, 1000)
	e := buildEpoch(t, f.g.mem, f.g.write(100), false, dev, 60)
	f.store.fail = func(call int, st ReplicaState) error { return errors.New("disk full") }
	if err := feed(f.r, f.gen, next, e); err == nil {
		t.Fatal("End succeeded with persist failing")
	}
	f.store.fail = nil
	if err := feed(f.r, f.gen, next, e); err != nil {
		t.Fatalf("epoch resent after a failed commit record: %v", err)
	}
	f.epoch, f.dev = next, dev
	f.check()
}

func TestReplicaOpenDiscardsLeftovers(t *testing.T) {
	f := newReplicaFixture(t)
	f.full()
	f.incr(10)
	st := f.r.State()
	ramBefore := bytes.Clone(f.ram)

	// Crash while staging: stage files are left behind.
	next := f.epoch + 1
	e := buildEpoch(t, f.g.mem, f.g.write(50), false, devstateFor(next, 300), 20)
	if err := f.r.Begin(f.gen, next, e.begin); err != nil {
		t.Fatal(err)
	}
	for _, b := range e.batches {
		if err := f.r.AddPages(next, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.addDev(f.r, next, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.r.stageW.Flush(); err != nil {
		t.Fatal(err)
	}
	f.r.stage.Close() // the process died: its descriptors are gone
	f.r.devstate.Close()
	// And commit records of epochs that are not the pending one.
	for _, name := range []string{"commit-1.pages", "commit-1.devstate", fmt.Sprintf("commit-%d.pages", next+5), "commit-junk.pages"} {
		if err := os.WriteFile(filepath.Join(f.dir, name), []byte("stale"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// Unrelated files are not the replica's to remove.
	other := filepath.Join(f.dir, "operator-notes.txt")
	if err := os.WriteFile(other, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"stage.pages", "stage.devstate"} {
		if _, err := os.Stat(filepath.Join(f.dir, name)); err != nil {
			t.Fatalf("test setup: %s: %v", name, err)
		}
	}

	f.open(f.store.load(t))
	f.checkNoLeftovers()
	if _, err := os.Stat(other); err != nil {
		t.Fatalf("OpenReplica removed an unrelated file: %v", err)
	}
	if f.r.State() != st || !bytes.Equal(f.ram, ramBefore) {
		t.Fatal("OpenReplica with only leftovers changed the replica")
	}
	// The primary resends the lost epoch; replication carries on.
	if err := feed(f.r, f.gen, next, e); err != nil {
		t.Fatal(err)
	}
	f.epoch, f.dev = next, devstateFor(next, 300)
	f.check()
	f.incr(20)
}

func TestReplicaOpenMissingCommitRecord(t *testing.T) {
	dir := t.TempDir()
	store := newAgentStore(t)
	ram := make([]byte, 4*PageSize)
	_, err := OpenReplica(dir, ram, ReplicaState{Generation: "g", Committed: 5, Applied: 4, Synced: true}, store.persist)
	if err == nil {
		t.Fatal("OpenReplica accepted a committed epoch whose record is gone")
	}
	if store.calls != 0 {
		t.Fatal("OpenReplica recorded something for an epoch it could not apply")
	}
}

func TestReplicaOpenCreatesDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b", "c")
	store := newAgentStore(t)
	r, err := OpenReplica(dir, make([]byte, PageSize), ReplicaState{}, store.persist)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		t.Fatalf("replica directory not created: %v", err)
	}
	if r.State() != (ReplicaState{}) {
		t.Fatalf("fresh replica state %+v", r.State())
	}
}

func TestReplicaReset(t *testing.T) {
	f := newReplicaFixture(t)
	f.full()
	f.incr(5)
	if err := f.r.Reset("gen-z"); err != nil {
		t.Fatal(err)
	}
	// Its RAM held a checkpoint: a primary may resync against its hashes.
	want := ReplicaState{Generation: "gen-z", Prefilled: true}
	if f.r.State() != want || f.store.load(t) != want {
		t.Fatalf("after Reset: %+v / persisted %+v", f.r.State(), f.store.load(t))
	}
	if err := f.r.Consistent(); !errors.Is(err, ErrNotConsistent) {
		t.Fatalf("Consistent after Reset: %v", err)
	}
	e := buildEpoch(t, f.g.mem, []uint64{1}, false, nil, 10)
	if err := feed(f.r, "gen-z", 100, e); !errors.Is(err, ErrNotConsistent) {
		t.Fatalf("incremental after Reset: %v, want ErrNotConsistent", err)
	}
	f.gen = "gen-z"
	f.full()
	f.incr(5)

	// Reset with a failing persist leaves the state as it was.
	before := f.r.State()
	f.store.fail = func(int, ReplicaState) error { return errors.New("disk full") }
	if err := f.r.Reset("gen-y"); err == nil {
		t.Fatal("Reset succeeded with persist failing")
	}
	if f.r.State() != before {
		t.Fatalf("failed Reset changed the state to %+v", f.r.State())
	}
}

// Replica.AddPages is where bytes from the network first meet the codec:
// a corrupt lz4 batch without data pages must be refused, not crash the
// standby agent.
func TestReplicaAddPagesLZ4WithoutDataPages(t *testing.T) {
	f := newReplicaFixture(t)
	if err := f.r.Begin(f.gen, 1, EpochBegin{Full: true, Pages: fixturePages}); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("AddPages panicked: %v", r)
		}
	}()
	b := batchBytes(1, []tableEntry{{0, pageZero}}, batchLZ4, lz4PanicBodies[0])
	if err := f.r.AddPages(1, b); !errors.Is(err, ErrBadBatch) {
		t.Fatalf("AddPages: %v, want ErrBadBatch", err)
	}
}

// fakeDisk records what the replica asks of a disk: a redo file per
// committed epoch, applied with the epoch's memory.
type fakeDisk struct {
	staged    []uint64
	applied   []string
	failApply error
}

func (d *fakeDisk) Stage(epoch uint64, path string) error {
	d.staged = append(d.staged, epoch)
	return os.WriteFile(path, []byte(fmt.Sprint(epoch)), 0o600)
}

func (d *fakeDisk) Apply(path string) error {
	if d.failApply != nil {
		return d.failApply
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	d.applied = append(d.applied, string(b))
	return nil
}

func TestReplicaDisksCommitAndApplyWithMemory(t *testing.T) {
	d := &fakeDisk{}
	f := newReplicaFixture(t, d)
	f.full()
	f.incr(10)
	if !slices.Equal(d.staged, []uint64{1, 2}) || !slices.Equal(d.applied, []string{"1", "2"}) {
		t.Fatalf("staged %v applied %v", d.staged, d.applied)
	}
	if _, err := os.Stat(f.r.diskPath(2, 0)); !os.IsNotExist(err) {
		t.Fatalf("redo file of an applied epoch left: %v", err)
	}
	// The disk apply fails (agent killed): the epoch is committed, not
	// applied; reopening applies memory and disk again.
	d.failApply = errors.New("agent killed")
	dirty := f.g.write(20)
	next := f.epoch + 1
	dev := devstateFor(next, 1000)
	if err := feed(f.r, f.gen, next, buildEpoch(t, f.g.mem, dirty, false, dev, 60)); err == nil {
		t.Fatal("End succeeded though the disk apply failed")
	}
	if st := f.r.State(); st.Committed != next || st.Applied == next {
		t.Fatalf("state %+v after a failed disk apply", st)
	}
	d.failApply = nil
	f.open(f.store.load(t))
	f.epoch, f.dev = next, dev
	f.check()
	if !slices.Equal(d.applied, []string{"1", "2", "3"}) {
		t.Fatalf("applied %v after recovery", d.applied)
	}
}

// Device state sent as a delta against the last committed epoch's is
// rebuilt whole on the standby, across chunks and length changes; a delta
// against an epoch the replica does not hold is refused and changes
// nothing.
func TestReplicaDevStateDelta(t *testing.T) {
	f := newReplicaFixture(t)
	f.full()
	prev := f.dev
	for i, n := range []int{2500, 2<<20 + 77, 3000, 100} { // grows, spans chunks, shrinks
		f.epoch++
		dev := devstateFor(f.epoch, n)
		copy(dev, prev[:min(len(prev), n/2)]) // the first half unchanged, as device state mostly is
		e := buildEpoch(t, f.g.mem, f.g.write(3), false, deltaAgainst(nil, dev, prev), 64)
		e.begin.DevStateLen, e.end.DevStateLen = uint64(n), uint64(n)
		e.begin.DevStateBase = f.epoch - 1
		e.end.DevStateCRC = crc32.Checksum(dev, crc32.MakeTable(crc32.Castagnoli))
		if err := feed(f.r, f.gen, f.epoch, e); err != nil {
			t.Fatalf("delta %d: %v", i, err)
		}
		f.dev, prev = dev, dev
		f.check()
	}
	// Negative controls: a base the replica does not hold (an older
	// epoch, another generation) is refused before anything is staged.
	for _, bad := range []struct {
		base uint64
		gen  string
	}{{f.epoch - 1, f.gen}, {f.epoch, "gen-other"}} {
		// A full epoch, so that only the base is wrong for another generation.
		e := buildEpoch(t, f.g.mem, nil, bad.gen != f.gen, deltaAgainst(nil, devstateFor(f.epoch+1, 100), prev), 64)
		e.begin.DevStateBase = bad.base
		err := feed(f.r, bad.gen, f.epoch+1, e)
		if err == nil || !strings.Contains(err.Error(), "does not hold") {
			t.Fatalf("delta against epoch %d of %s: %v, want refused", bad.base, bad.gen, err)
		}
	}
	f.check()
	// A delta computed against other bytes than the replica's base (a
	// primary that lies, or a bug) arrives intact but rebuilds wrong: the
	// whole state's checksum refuses it.
	wrongBase := devstateFor(999, len(prev))
	dev := devstateFor(f.epoch+1, 100)
	e := buildEpoch(t, f.g.mem, nil, false, deltaAgainst(nil, dev, wrongBase), 64)
	e.begin.DevStateBase = f.epoch
	e.end.DevStateCRC = crc32.Checksum(dev, crc32.MakeTable(crc32.Castagnoli))
	if err := feed(f.r, f.gen, f.epoch+1, e); !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), "rebuilt against") {
		t.Fatalf("a delta against the wrong base: %v, want refused", err)
	}
	f.check()
	// After a reset no base is held, even for the same numbers.
	if err := f.r.Reset(f.gen); err != nil {
		t.Fatal(err)
	}
	e = buildEpoch(t, f.g.mem, nil, true, deltaAgainst(nil, devstateFor(f.epoch+1, 100), prev), 64)
	e.begin.DevStateBase = f.epoch
	if err := feed(f.r, f.gen, f.epoch+1, e); err == nil {
		t.Fatal("a delta after Reset was accepted")
	}
}

// A shell whose RAM was filled from a copy of the guest resyncs against
// its page hashes: the base epoch brings the pages that differ and makes
// the replica synced. Without the prefill (or a checkpoint) it is refused.
func TestReplicaPrefilledBaseResync(t *testing.T) {
	f := newReplicaFixture(t)
	e := buildEpoch(t, f.g.mem, []uint64{2, 5}, false, devstateFor(1, 3000), 10)
	e.begin.Base = true
	if err := feed(f.r, f.gen, 1, e); !errors.Is(err, ErrNotConsistent) {
		t.Fatalf("base epoch on garbage RAM: %v, want ErrNotConsistent", err)
	}
	// The RAM is the guest's but for pages 2 and 5 (what changed since
	// the copy was taken).
	copy(f.ram, f.g.mem)
	f.g.mem[2*PageSize], f.g.mem[5*PageSize+9] = 0xee, 0xee
	if err := f.r.MarkPrefilled(); err != nil {
		t.Fatal(err)
	}
	if err := f.r.Consistent(); !errors.Is(err, ErrNotConsistent) {
		t.Fatalf("a prefilled replica is consistent before its resync: %v", err)
	}
	e = buildEpoch(t, f.g.mem, []uint64{2, 5}, false, devstateFor(1, 3000), 10)
	e.begin.Base = true
	if err := feed(f.r, f.gen, 1, e); err != nil {
		t.Fatal(err)
	}
	if st := f.r.State(); !st.Synced || st.Prefilled || st.Committed != 1 {
		t.Fatalf("after the base epoch: %+v", st)
	}
	if err := f.r.Consistent(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f.ram, f.g.mem) {
		t.Fatal("RAM differs from the guest after the base resync")
	}
}
