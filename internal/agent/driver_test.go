package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/remora-ha/remora/txlog"

	"github.com/digitalocean/go-qemu/qmp"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint/outcommit"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/migrate/qemu"
)

// fakeArbiter answers every call with err (or success when nil).
type fakeArbiter struct {
	err   error
	calls []string
}

func (f *fakeArbiter) Addr() string { return "arbiter:7410" }
func (f *fakeArbiter) Register(_ context.Context, s arbiter.GuestSpec) (arbiter.Registration, error) {
	f.calls = append(f.calls, "register")
	return arbiter.Registration{Epoch: s.Epoch + 1, Role: s.Role}, f.err
}
func (f *fakeArbiter) Renew(_ context.Context, g, a string, e uint64) (arbiter.Lease, error) {
	f.calls = append(f.calls, "renew")
	return arbiter.Lease{Epoch: e}, f.err
}
func (f *fakeArbiter) RequestPromotion(_ context.Context, g, a string, e uint64) (arbiter.Grant, error) {
	f.calls = append(f.calls, "promotion")
	return arbiter.Grant{Epoch: e + 1}, f.err
}
func (f *fakeArbiter) Handover(_ context.Context, g, a string, e uint64, s string) (arbiter.Grant, error) {
	f.calls = append(f.calls, "handover")
	return arbiter.Grant{}, f.err
}
func (f *fakeArbiter) ReportStandbyLost(_ context.Context, g, a string, e uint64) (arbiter.Lease, error) {
	f.calls = append(f.calls, "standby lost")
	return arbiter.Lease{Epoch: e + 1}, f.err
}
func (f *fakeArbiter) ReportSynced(_ context.Context, g, a string, e uint64, s string) error {
	f.calls = append(f.calls, "synced")
	return f.err
}
func (f *fakeArbiter) Retire(_ context.Context, g, a string, e uint64) error {
	f.calls = append(f.calls, fmt.Sprintf("retire %s %s %d", g, a, e))
	return f.err
}
func (f *fakeArbiter) Heartbeat(context.Context, string, map[string]uint64) (arbiter.HeartbeatReply, error) {
	return arbiter.HeartbeatReply{}, f.err
}
func (f *fakeArbiter) Status(context.Context) (arbiter.Status, error) { return arbiter.Status{}, f.err }
func (f *fakeArbiter) Suspend(_ context.Context, g, a string, e uint64, d time.Duration) (arbiter.Lease, error) {
	f.calls = append(f.calls, "suspend")
	return arbiter.Lease{Epoch: e}, f.err
}

func testGuest(arb Coordinator, role Role) *guest {
	a := &Agent{cfg: api.Defaults(), log: quietLog(), arb: arb}
	a.cfg.AgentID = "host-a"
	rec := &Record{Name: "g1", Role: api.RolePrimary}
	m := NewPrimary(a.settings(), 3, false, false)
	if role == Standby {
		rec.Role = api.RoleStandby
		m = NewStandby(a.settings(), 3, false, false)
	}
	return newGuest(a, rec, m)
}

// The driver turns the arbiter's answers into the machine's events: a
// stale epoch with no role is a superseded copy, one with a role is a
// fence to adopt, anything else a failure to retry.
func TestDriverMapsArbiterAnswers(t *testing.T) {
	stale := func(role arbiter.Role) error {
		return &arbiter.Error{Code: arbiter.CodeStaleEpoch, CurrentEpoch: 7, Primary: "host-b", Role: role}
	}
	for _, c := range []struct {
		name string
		role Role
		act  Action
		err  error
		want Event
	}{
		{"renewed", Primary, DoRenew{}, nil, Renewed{}},
		{"replaced primary", Primary, DoRenew{}, stale(arbiter.RoleNone), Superseded{Fence: 7, Primary: "host-b"}},
		{"fence moved", Primary, DoReportSynced{}, stale(arbiter.RolePrimary), FenceMoved{Fence: 7}},
		{"standby at a stale fence", Standby, DoRequestPromotion{}, stale(arbiter.RoleNone), FenceMoved{Fence: 7}},
		{"unreachable", Primary, DoRegister{}, errors.New("dial tcp: i/o timeout"), ArbiterFailed{}},
		{"lease valid", Standby, DoRequestPromotion{}, &arbiter.Error{Code: arbiter.CodeLeaseValid}, ArbiterFailed{}},
		{"granted", Standby, DoRequestPromotion{}, nil, PromotionGranted{}},
		{"standby lost", Primary, DoReportStandbyLost{}, nil, StandbyLostGranted{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := testGuest(&fakeArbiter{err: c.err}, c.role)
			ev := g.call(context.Background(), c.act)
			switch want := c.want.(type) {
			case Superseded, FenceMoved:
				if ev != want {
					t.Fatalf("got %#v, want %#v", ev, want)
				}
			default:
				if typeName(ev) != typeName(want) {
					t.Fatalf("got %#v, want a %T", ev, want)
				}
			}
		})
	}
}

func typeName(v any) string { return fmt.Sprintf("%T", v) }

// failingMonitor fails every QMP command.
type failingMonitor struct{}

func (failingMonitor) Connect() error    { return nil }
func (failingMonitor) Disconnect() error { return nil }
func (failingMonitor) Run([]byte) ([]byte, error) {
	return nil, errors.New("monitor gone")
}
func (failingMonitor) Events(context.Context) (<-chan qmp.Event, error) {
	return nil, errors.New("none")
}

// A pause the driver could not carry out is reported as failed, so the
// machine orders it again rather than count the guest as fenced.
func TestDriverReportsFailedPause(t *testing.T) {
	g := testGuest(nil, Primary)
	g.a.cfg.HeartbeatInterval = 10 * time.Millisecond
	p := &primaryRun{vm: &qemu.CaptureVM{G: &qemu.Guest{Name: "g1", Mon: failingMonitor{}}}}
	g.primary = p
	p.do(context.Background(), g, DoPause{Why: "test"})
	select {
	case ev := <-g.events:
		if pe, ok := ev.(Paused); !ok || pe.Err == nil {
			t.Fatalf("got %#v, want a failed Paused", ev)
		}
	default:
		t.Fatal("no event")
	}
	if p.vm.Fenced() {
		t.Fatal("the guest counts as fenced though QEMU never stopped it")
	}
}

// Unenrolling a promoted guest retires its record at the arbiter, where
// this host is the primary: a later enrollment of that name elsewhere (a
// re-protect) then starts afresh.
func TestUnenrollPromotedRetiresAtTheArbiter(t *testing.T) {
	for _, arbErr := range []error{nil, errors.New("arbiter unreachable")} {
		arb := &fakeArbiter{err: arbErr}
		g := testGuest(arb, Standby)
		g.a.store = recordStore{dir: t.TempDir()}
		g.a.guests = map[string]*guest{g.name: g}
		g.m.Promoted, g.m.Fence = true, 4
		if err := g.a.store.save(g.rec); err != nil {
			t.Fatal(err)
		}
		j, _, err := openJournal(t.TempDir(), quietLog())
		if err != nil {
			t.Fatal(err)
		}
		defer j.close()
		g.a.journal = j
		if err := j.append(context.Background(), true, txlog.TypePlain, 0, journalEvent{Kind: "promote", Guest: g.name, Fence: 4}); err != nil {
			t.Fatal(err)
		}
		err = g.a.Unenroll(context.Background(), g.name)
		if got := fmt.Sprint(arb.calls); got != "[retire g1 host-a 4]" {
			t.Fatalf("arbiter calls: %s", got)
		}
		if arbErr == nil && err != nil {
			t.Fatalf("unenroll: %v", err)
		}
		if arbErr != nil && (err == nil || !strings.Contains(err.Error(), "enroll and unenroll it here again")) {
			t.Fatalf("unenroll with the arbiter down: %v", err)
		}
		if g.a.guest(g.name) != nil {
			t.Fatal("guest still listed after unenroll")
		}
		if recs, _ := g.a.store.loadAll(); len(recs) != 0 {
			t.Fatalf("records left: %d", len(recs))
		}
		// The journal forgets the promoted fence: a later replica of the
		// same name must not start at it after a restart.
		if st, ok := j.state(g.name); ok {
			t.Fatalf("the journal still holds %+v after unenroll", st)
		}
	}
}

// heldOutput is an output buffer that counts ReleaseAll calls; held frames
// come back with each cut, as in the real buffers.
type heldOutput struct {
	held, releases int
}

func (o *heldOutput) Cut(uint64) error     { o.held++; return nil }
func (o *heldOutput) Release(uint64) error { return nil }
func (o *heldOutput) DiscardAfter(uint64)  {}
func (o *heldOutput) Stats() outcommit.Stats {
	return outcommit.Stats{HeldFrames: o.held}
}
func (o *heldOutput) Close() error      { return nil }
func (o *heldOutput) Detach()           {}
func (o *heldOutput) ReleaseAll() error { o.releases++; o.held = 0; return nil }

// While the output is free, what a cut holds again (a slow resync cuts
// epochs the standby does not acknowledge) is let go at the next tick, so
// an unprotected guest keeps answering; nothing held, nothing to do.
func TestKeepOutputFreeReleasesWhatCutsHeld(t *testing.T) {
	g := testGuest(nil, Primary)
	out := &heldOutput{}
	p := &primaryRun{out: out}
	p.do(context.Background(), g, DoKeepOutputFree{})
	if out.releases != 0 {
		t.Fatalf("released with nothing held: %d calls", out.releases)
	}
	_ = out.Cut(5)
	p.do(context.Background(), g, DoKeepOutputFree{})
	if out.releases != 1 || out.held != 0 {
		t.Fatalf("after a cut held frames: %d releases, %d held", out.releases, out.held)
	}
}
