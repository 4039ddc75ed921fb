// Package api is the agent's admin API as `remora vm` and tests see it:
// the configuration that says where an agent listens, the JSON types of
// the API, and its client. It needs no libvirt, so a binary built without
// cgo can talk to an agent.
package api

import (
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
)

// Roles of a guest on an agent.
const (
	RolePrimary  = "primary"
	RoleStandby  = "standby"
	RolePromoted = "promoted" // was the standby; runs the guest since a failover
)

// Event is one line of a guest's history on an agent (`vm events`), from
// its journal.
type Event struct {
	Time   time.Time `json:"time,omitzero"`
	Kind   string    `json:"kind"` // enrolled, state, synced, failover, promoted, reset, unenrolled, dropped, ...
	Detail string    `json:"detail,omitempty"`
	Epoch  uint64    `json:"epoch,omitempty"`
	Fence  uint64    `json:"fence,omitempty"`
}

// VMStatus is one guest as `remora vm status` shows it.
type VMStatus struct {
	Guest        string        `json:"guest"`
	Role         string        `json:"role"`
	State        string        `json:"state"`
	Peer         string        `json:"peer"`
	Fence        uint64        `json:"fence"`
	Epoch        uint64        `json:"epoch"`
	AckedEpoch   uint64        `json:"acked_epoch"`
	Started      uint64        `json:"started_epoch,omitempty"` // primary: newest epoch whose capture began
	EpochsPerSec float64       `json:"epochs_per_sec"`
	PauseP50     time.Duration `json:"pause_p50_ns"`
	PauseP99     time.Duration `json:"pause_p99_ns"`
	PauseMax     time.Duration `json:"pause_max_ns,omitempty"` // the longest incremental pause since the agent started
	DirtyPages   uint64        `json:"dirty_pages"`
	DirtyTotal   uint64        `json:"dirty_total,omitempty"`
	Incremental  uint64        `json:"incremental,omitempty"`
	Bytes        uint64        `json:"bytes"` // sent (primary) or received (standby)
	RawBytes     uint64        `json:"raw_bytes,omitempty"`
	PageWire     uint64        `json:"page_wire_bytes,omitempty"` // of Bytes, page batches (lz4, zero pages elided)
	// The last epoch's device state, whole and as sent (a delta, lz4).
	DevStateBytes int64 `json:"devstate_bytes,omitempty"`
	DevStateWire  int64 `json:"devstate_wire_bytes,omitempty"`
	// Epochs started before their tick because the guest had output held.
	OutputTriggered uint64                     `json:"output_triggered_epochs,omitempty"`
	Lag             time.Duration              `json:"lag_ns"`
	Tracker         string                     `json:"tracker,omitempty"`
	LastPause       *checkpoint.PauseBreakdown `json:"last_pause,omitempty"`
	PauseMedian     *checkpoint.PauseBreakdown `json:"pause_breakdown_p50,omitempty"`
	SyncPages       uint64                     `json:"sync_pages,omitempty"` // pages the last (re)sync sent
	// StaleAcks counts acknowledgements that came too late to release
	// output (after the standby's ack window): a link too slow.
	StaleAcks uint64 `json:"stale_acks,omitempty"`
	SyncDone  uint64 `json:"sync_done_bytes,omitempty"`
	SyncTotal uint64 `json:"sync_total_bytes,omitempty"`
	Shell     string `json:"shell,omitempty"`
	// Domain (primary) is the libvirt domain the guest runs in here when
	// it is not the guest's name (a guest failed over here runs in its shell).
	Domain      string        `json:"domain,omitempty"`
	Home        string        `json:"home,omitempty"` // the agent it was enrolled from; failback returns it there
	Applied     uint64        `json:"applied_epoch,omitempty"`
	LastError   string        `json:"last_error,omitempty"`
	LeaseHolder string        `json:"lease_holder,omitempty"`
	LeaseValid  time.Duration `json:"lease_valid_ns,omitempty"` // remaining, on this agent's clock
	Heartbeat   string        `json:"heartbeat,omitempty"`      // ok, or how long the peer has been silent
	Probe       string        `json:"probe,omitempty"`          // the arbiter's last check of the guest's service
	Arbiter     string        `json:"arbiter,omitempty"`        // the arbiter's latest answer worth showing
	// The last automatic failover: when the primary was first suspected,
	// when the arbiter granted promotion, when the guest ran again.
	SuspectedAt time.Time `json:"suspected_at,omitzero"`
	GrantedAt   time.Time `json:"granted_at,omitzero"`
	RestoredAt  time.Time `json:"restored_at,omitzero"`
	NextRetry   time.Time `json:"next_retry,omitzero"`
	// Output is the guest's output commit (primary only).
	Output *OutputStatus `json:"output,omitempty"`
	// Disk is the guest's disk replication.
	Disk *DiskStatus `json:"disk,omitempty"`
}

// OutputStatus is a guest's output commit as `vm status` shows it.
type OutputStatus struct {
	Backend         string        `json:"backend"`
	Netdev          string        `json:"netdev,omitempty"`
	Holding         bool          `json:"holding"` // false while unprotected (output flows)
	HeldFrames      int           `json:"held_frames"`
	HeldBytes       int64         `json:"held_bytes"`
	LastCut         uint64        `json:"last_cut"`
	LastReleased    uint64        `json:"last_released"`
	ReleasedFrames  uint64        `json:"released_frames"`
	ReleasedBytes   uint64        `json:"released_bytes"`
	ForwardedFrames uint64        `json:"forwarded_frames"` // sent on unheld (before protection, or unprotected)
	DroppedFrames   uint64        `json:"dropped_frames"`   // the buffer was full
	DiscardedFrames uint64        `json:"discarded_frames"` // of epochs that were never acknowledged
	ReleaseP50      time.Duration `json:"release_p50_ns"`   // how long frames were held
	ReleaseP99      time.Duration `json:"release_p99_ns"`
}

// DiskStatus is a guest's disk replication as `vm status` shows it.
type DiskStatus struct {
	Devs []string `json:"devs"`
	// Standby: the writes of the last cut epoch and what is buffered,
	// summed over the disks.
	LastEpochWrites int    `json:"last_epoch_writes,omitempty"`
	LastEpochBytes  int64  `json:"last_epoch_bytes,omitempty"`
	HeldEpochs      int    `json:"held_epochs,omitempty"` // cut, not applied yet
	HeldBytes       int64  `json:"held_bytes,omitempty"`
	AppliedBytes    uint64 `json:"applied_bytes,omitempty"`
	OutOfSync       string `json:"out_of_sync,omitempty"`

	State     string `json:"state"` // syncing, mirrored, resync needed
	SyncDone  int64  `json:"sync_done_bytes,omitempty"`
	SyncTotal int64  `json:"sync_total_bytes,omitempty"`
	Resyncs   int    `json:"resyncs"` // disk resyncs since the agent started
	// LastResyncBytes is what the last resync copied (only the blocks
	// that differed, when the standby's image could be compared).
	LastResyncBytes int64 `json:"last_resync_bytes"`
}

// FailoverResult says what a failover restored.
type FailoverResult struct {
	Guest    string        `json:"guest"`
	Epoch    uint64        `json:"epoch"`
	Fence    uint64        `json:"fence"`
	Duration time.Duration `json:"duration_ns"`
}

// SwitchoverResult says what a switchover (or failback) did.
type SwitchoverResult struct {
	Guest string `json:"guest"`
	From  string `json:"from"`
	To    string `json:"to"`
	Epoch uint64 `json:"epoch"` // the final checkpoint the guest runs on from
	Fence uint64 `json:"fence"`
	// Downtime is from the guest's pause here to its standby's report
	// that it runs there.
	Downtime time.Duration `json:"downtime_ns"`
}

// MoveOutcome is one guest's switchover in a drain or undrain.
type MoveOutcome struct {
	Guest  string           `json:"guest"`
	Result SwitchoverResult `json:"result"`
	Error  string           `json:"error,omitempty"`
}

// EnrollRequest is the body of POST /v1/enroll.
type EnrollRequest struct {
	Guest   string            `json:"guest"`
	Standby string            `json:"standby"`
	Probe   arbiter.ProbeSpec `json:"probe,omitzero"`
}

// GuestRequest names one guest.
type GuestRequest struct {
	Guest string `json:"guest"`
	Force bool   `json:"force,omitempty"`
}

// Error is the body of every failed API call.
type Error struct {
	Error string `json:"error"`
}

// AgentInfo is the agent itself: who it is, what it runs on, and warnings
// an admin should act on (a certificate about to expire, plaintext mode).
type AgentInfo struct {
	Agent      string   `json:"agent"`
	Goroutines int      `json:"goroutines"`
	HeapBytes  uint64   `json:"heap_bytes"`
	Replicas   int      `json:"replicas"`
	Warnings   []string `json:"warnings,omitempty"`
}
