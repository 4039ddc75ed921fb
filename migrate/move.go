// Package migrate holds the hypervisor side of remora: a pure-Go QEMU
// layer (migrate/qemu), the libvirt layer (migrate/virt, the only cgo
// package) and, here, the role moves of a guest (failover today;
// switchover, failback and re-protect next) as explicit step sequences,
// each step recorded in the agent's journal so that a move an agent died
// in is finished or rolled back on restart.
package migrate

import (
	"context"
	"errors"
	"fmt"
	"slices"
)

// A Move is one role change of one guest, run as named steps.
type Move struct {
	Kind  string // failover, ...
	Guest string
	Fence uint64 // the fencing epoch the guest runs at once the move commits
	Epoch uint64 // the checkpoint epoch the move starts the guest from
	Steps []Step
}

// Step is one step of a move. Its record is written after it ran; a step
// must be safe to run again when an agent died before its record.
type Step struct {
	Name string
	Kind StepKind
	Run  func(ctx context.Context) error
}

// StepKind says how a step is recorded.
type StepKind int

const (
	StepData    StepKind = iota // recorded, not forced to disk
	StepPrepare                 // durable: the move's intent; recovery finds it in doubt
	StepCommit                  // durable: the point of no return
)

// Journal records a move's transaction (the agent's txlog).
type Journal interface {
	// Begin starts the move's transaction (durably).
	Begin(ctx context.Context, m *Move) (tx uint64, err error)
	// Step records a step that ran.
	Step(ctx context.Context, tx uint64, m *Move, s Step) error
	// Abort rolls the move back: why is recorded.
	Abort(ctx context.Context, tx uint64, m *Move, why string) error
	// End closes a committed move's transaction.
	End(ctx context.Context, tx uint64, m *Move) error
}

// Progress is how far a move got, as its journal tells.
type Progress struct {
	Tx        uint64   // 0: not begun
	Done      []string // steps recorded
	Committed bool
}

// ErrRolledBack means the move was undone (recorded as aborted) and the
// guest is where it was before.
var ErrRolledBack = errors.New("move rolled back")

// Run runs m's steps that p does not list as done, recording each, then
// ends the transaction. A step that fails before the commit leaves the
// move in doubt for the caller to resume (Run again) or roll back (Abort).
func Run(ctx context.Context, j Journal, m *Move, p Progress) (Progress, error) {
	if p.Tx == 0 {
		tx, err := j.Begin(ctx, m)
		if err != nil {
			return p, fmt.Errorf("%s of %s: record its start: %w", m.Kind, m.Guest, err)
		}
		p = Progress{Tx: tx}
	}
	for _, s := range m.Steps {
		if slices.Contains(p.Done, s.Name) {
			continue
		}
		if err := s.Run(ctx); err != nil {
			return p, fmt.Errorf("%s of %s: %s: %w", m.Kind, m.Guest, s.Name, err)
		}
		if err := j.Step(ctx, p.Tx, m, s); err != nil {
			return p, fmt.Errorf("%s of %s: record step %s: %w", m.Kind, m.Guest, s.Name, err)
		}
		p.Done = append(p.Done, s.Name)
		if s.Kind == StepCommit {
			p.Committed = true
		}
	}
	if err := j.End(ctx, p.Tx, m); err != nil {
		return p, fmt.Errorf("%s of %s: record its end: %w", m.Kind, m.Guest, err)
	}
	return p, nil
}

// Abort rolls back a move that has not committed.
func Abort(ctx context.Context, j Journal, m *Move, p Progress, why string) error {
	if p.Committed {
		return fmt.Errorf("%s of %s committed: it cannot be rolled back", m.Kind, m.Guest)
	}
	if p.Tx == 0 {
		return nil
	}
	if err := j.Abort(ctx, p.Tx, m, why); err != nil {
		return err
	}
	return fmt.Errorf("%s of %s: %w: %s", m.Kind, m.Guest, ErrRolledBack, why)
}
