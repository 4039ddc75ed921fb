package arbiter

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/remora-ha/remora/internal/atomicfile"
)

// storeFormat is bumped on incompatible changes to guestRecord.
const storeFormat = 1

// guestRecord is the durable state of one guest, one JSON file each.
type guestRecord struct {
	Format int    `json:"format"`
	Guest  string `json:"guest"`
	Epoch  uint64 `json:"epoch"`

	Primary     string `json:"primary"`
	PrimaryAddr string `json:"primary_addr,omitempty"`
	Standby     string `json:"standby,omitempty"`
	StandbyAddr string `json:"standby_addr,omitempty"`
	// StandbyEpoch is the epoch at which Standby registered. A standby
	// registration only counts while it equals Epoch, so any epoch change
	// forces the standby to learn the new epoch and re-register.
	StandbyEpoch     uint64    `json:"standby_epoch,omitempty"`
	InSync           bool      `json:"in_sync"`
	UnprotectedSince time.Time `json:"unprotected_since"`

	// Lease renewals are not persisted (that would cost an fsync per
	// renewal); after a restart the arbiter instead assumes the holder's
	// lease runs for LeaseDuration from the restart.
	LeaseHolder   string        `json:"lease_holder,omitempty"`
	LeaseDuration time.Duration `json:"lease_duration,omitempty"`
	LeaseGranted  time.Time     `json:"lease_granted"`
	// LeaseExpires is the expiry at the last write; diagnostic only.
	LeaseExpires time.Time `json:"lease_expires"`
	// SuspendedFor is set by Suspend until the primary renews or registers
	// again. A restart in between assumes the suspension runs in full from
	// the restart, as it does for leases: it never ends before LeaseExpires.
	SuspendedFor time.Duration `json:"suspended_for,omitempty"`

	Service ProbeSpec   `json:"service,omitempty"`
	Last    *Transition `json:"last_transition,omitempty"`
	// Retired is set when the primary unenrolled the guest. The record
	// stays so that a later enrollment starts above its epoch.
	Retired bool `json:"retired,omitempty"`

	// leaseExpiry is the in-memory expiry on the arbiter's clock (keeps
	// the monotonic reading with the real clock).
	leaseExpiry time.Time
}

// store keeps guest records under dir/guests and holds an exclusive lock
// on dir/LOCK so two arbiters never share (and fork) the same state.
type store struct {
	dir  string
	lock *os.File
}

func openStore(dir string) (*store, map[string]*guestRecord, error) {
	if dir == "" {
		return nil, nil, errors.New("arbiter: state dir not set")
	}
	gdir := filepath.Join(dir, "guests")
	if err := mkdirDurable(gdir); err != nil {
		return nil, nil, fmt.Errorf("arbiter: state dir: %w", err)
	}
	lock, err := lockFile(filepath.Join(dir, "LOCK"))
	if err != nil {
		return nil, nil, fmt.Errorf("arbiter: state dir %s: %w", dir, err)
	}
	s := &store{dir: dir, lock: lock}
	recs, err := s.load()
	if err != nil {
		s.close()
		return nil, nil, err
	}
	return s, recs, nil
}

// mkdirDurable is os.MkdirAll that fsyncs every directory it creates and
// that directory's parent, so a crash cannot lose the directory and with
// it the records later written (and fsynced) into it.
func mkdirDurable(dir string) error {
	fi, err := os.Stat(dir)
	switch {
	case err == nil && fi.IsDir():
		return nil
	case err == nil:
		return fmt.Errorf("%s is not a directory", dir)
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	parent := filepath.Dir(dir)
	if err := mkdirDurable(parent); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	return syncDir(parent)
}

// syncDir fsyncs a directory; a variable so tests can see the calls.
var syncDir = func(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (s *store) guestDir() string { return filepath.Join(s.dir, "guests") }

func (s *store) load() (map[string]*guestRecord, error) {
	ents, err := os.ReadDir(s.guestDir())
	if err != nil {
		return nil, fmt.Errorf("arbiter: %w", err)
	}
	recs := map[string]*guestRecord{}
	for _, e := range ents {
		name := e.Name()
		path := filepath.Join(s.guestDir(), name)
		if strings.HasPrefix(name, ".tmp-") {
			// A write that crashed before its rename; the previous
			// version of the file is intact.
			os.Remove(path)
			continue
		}
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("arbiter: %w", err)
		}
		var r guestRecord
		if err := json.Unmarshal(b, &r); err != nil {
			// Refuse to start rather than forget a guest's epoch and
			// risk handing it out again.
			return nil, fmt.Errorf("arbiter: corrupt state file %s: %w", path, err)
		}
		if r.Format != storeFormat {
			return nil, fmt.Errorf("arbiter: state file %s has format %d, this arbiter reads %d", path, r.Format, storeFormat)
		}
		if r.Guest+".json" != name {
			return nil, fmt.Errorf("arbiter: state file %s holds guest %q", path, r.Guest)
		}
		recs[r.Guest] = &r
	}
	return recs, nil
}

// save durably replaces the record: write temp, fsync, rename, fsync dir.
// Only after save returns may the caller act on (or reply with) the record.
func (s *store) save(r *guestRecord) error {
	r.Format = storeFormat
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(s.guestDir(), r.Guest+".json"), append(b, '\n'))
}

func (s *store) close() error {
	if s.lock == nil {
		return nil
	}
	err := unlockFile(s.lock)
	s.lock = nil
	return err
}
