// Package arbiter decides, for every protected guest, which agent may run
// it, so that exactly one copy of a guest ever runs.
//
// The arbiter runs on a third machine on the clients' side of the network.
// Agents (one per hypervisor host) talk to it over TCP with mutual TLS. It
// keeps, per guest and durably, a fencing epoch, the primary and standby
// agents, the primary's lease and whether the standby is in sync. It also
// probes each guest's service and each agent from where the clients are.
//
// # Epochs and leases
//
// A fencing epoch is a per-guest counter. Only these change it, each by
// exactly one:
//
//   - RequestPromotion: the standby becomes primary at epoch+1.
//   - ReportStandbyLost: the primary continues alone at epoch+1.
//   - Retire: the primary unenrolled the guest; its roles and lease are
//     forgotten at epoch+1 (the record stays for its epoch).
//   - Register with Fresh (a new enrollment by a primary holding no
//     epoch) of a retired guest, or of one whose primary is the caller:
//     epoch+1 with no standby. Another agent's guest is refused.
//   - Recovery of a guest whose record was lost (see below): the highest
//     claimed epoch+1.
//
// Each requires the caller's epoch to be current (or supersedes it), so
// for any epoch at most one of them is ever granted; the loser gets
// ErrStaleEpoch. The new epoch
// is on disk before the grant is answered, and epochs survive restarts, so
// no epoch is handed out twice.
//
// The primary may serve (release guest output) only while it holds a lease.
// Leases last Config.LeaseDuration (default 3 s) and are renewed with Renew.
// A promotion is granted only after the primary's lease has expired on the
// arbiter's clock, or earlier once the primary's agent, heard since the
// arbiter started and not suspended, has missed its heartbeats; only if
// the standby is in sync, and only if the guest's service no longer
// answers the arbiter's probe. The early grant relies on the agents'
// contract below: a primary with a standby in sync releases only output
// the standby acknowledged, and a standby stops acknowledging before it
// asks to be promoted. The client library
// computes Lease.ValidUntil from the moment the request was sent, minus
// DriftMargin, so the primary's own view of its lease always ends before
// the arbiter's. After a restart the arbiter assumes any lease it had
// granted runs for a full lease duration (or suspension) from the restart.
//
// Suspend(d) holds off promotion for d (at most Config.MaxSuspend,
// default 30 s) while the primary's agent restarts on purpose and its
// guest keeps running. It follows Renew's epoch rules, is persisted, and
// ends early when the primary renews or registers again. The caller itself
// gets a normal lease, so ending the hold early never cuts a lease any
// agent relies on.
//
// # Contract for agents
//
// Identity: an agent's id is its certificate name (CN/DNS SAN, see package
// internal/pki). Every request names the agent; a mismatch is refused with
// ErrUnauthorized and logged with the peer address.
//
// Every agent persists, per guest, the last epoch it learned, heartbeats
// the arbiter every Heartbeat.Interval with Heartbeat(ctx, id, epochs), and
// serialises its arbiter calls per guest (one goroutine per guest).
//
// Primary, per guest:
//
//  1. Register(GuestSpec{Role: RolePrimary, Epoch: last known or 0}). The
//     registration carries the epoch to use from now on and a lease.
//  2. Renew every LeaseDuration/3. Stop releasing guest output at
//     Lease.ValidUntil unless a later Renew succeeded. ErrUnavailable
//     means the outcome is unknown: keep the old ValidUntil and retry.
//  3. When the standby has a complete, consistent copy, ReportSynced.
//  4. When replication to the standby fails, hold guest output and call
//     ReportStandbyLost. On success continue alone with the returned
//     lease's (new) epoch. Never release output that the standby has not
//     acknowledged without this grant.
//  5. On ErrStaleEpoch from any call, look at Error.Role. RoleNone: the
//     guest was granted to someone else; destroy the local copy at once,
//     then (optionally) Register as standby with Error.CurrentEpoch.
//     RolePrimary: the arbiter still has the caller as primary (its own
//     concurrent call advanced the epoch, or it restarted and lost its
//     epoch); adopt Error.CurrentEpoch.
//  6. Release before a planned switchover, after the guest has stopped.
//  7. Before restarting the agent on purpose with the guest left running,
//     Suspend for a bound on the restart; the restarted agent registers
//     with the epoch it persisted.
//
// Standby, per guest:
//
//  1. Register(GuestSpec{Role: RoleStandby, Epoch: 0 or current,
//     AgentAddr: replication host:port}). Registering (again) always
//     marks the standby out of sync until the primary calls ReportSynced.
//  2. Heartbeat replies (Assignment) tell it the current epoch and whether
//     it is in sync and still the standby; Role RoleNone means its copy is
//     fenced: discard it and register again.
//  3. When the agent-agent heartbeat detector (package arbiter/heartbeat)
//     suspects the primary, call RequestPromotion with the current epoch.
//     ErrLeaseValid (the primary's lease has not run out; retry after
//     Error.RetryAfter) and ErrServiceAlive (clients still reach the
//     guest) mean: do not start the guest, keep retrying while the
//     suspicion lasts. On success start the guest and act as primary at
//     Grant.Epoch with Grant.Lease.
//
// Every operation is idempotent for the same epoch: a retry after a lost
// reply gets the same grant rather than ErrStaleEpoch. The client retries
// once on a fresh connection by itself; further retries are the caller's.
// ErrRecovering (see below) is answered to every role: retry after
// Error.RetryAfter.
//
// A cut replication link with both agents reachable from the arbiter: the
// standby is refused (ErrLeaseValid, the primary renews), the primary's
// report is granted with a new epoch, which fences the standby, and the
// guest goes on serving unprotected until the standby is back in sync.
// Holding its output until the link heals would cut it off its clients.
//
// # Recovery from a lost state
//
// An arbiter that lost its state directory knows no epochs, so the first
// agent to speak must not decide: a stale primary, replaced at a higher
// epoch before the loss, would be made primary again. When agents hold
// epochs for a guest the arbiter has no record of (Register without
// Fresh naming an epoch, or a Heartbeat naming it), the guest is
// recovering: for 2 x LeaseDuration from the first claim (never ending
// before 2 x LeaseDuration after the arbiter started, so every lease the
// lost state granted has run out) the arbiter collects claims (agent, role
// claimed, epoch) from registrations, renewals and heartbeats (which claim
// no role) and grants nothing: every request about the guest gets
// ErrRecovering with the time left. Then the single claimant of the
// primary role at the highest claimed epoch becomes primary at that
// epoch+1, so no epoch is reissued and every claim is stale; a single
// standby claimant at that epoch stays its standby, out of sync. Its next
// registration repeating its claim is answered with the new epoch;
// everyone else is told ErrStaleEpoch (Role RoleNone for a stale primary).
// If no claimant, or more than one, claims the primary role at the highest
// epoch, nothing is decided (it is logged, and shown in Status) until a
// new claim settles it, or until a fresh enrollment gives up the claimed
// epochs and starts above them. A fresh enrollment of a guest nobody
// claims is immediate, as is a primary registering with epoch 0. The
// decision and its claims are logged. Claims live in memory only: an
// arbiter restarted during a recovery collects them anew.
//
// # Probes
//
// Per guest, a service check runs from the arbiter's host (Config.Services,
// or the ProbeSpec the primary registers): a TCP connect, or a line
// exchange matched by prefix and/or regexp. Every agent with an AgentAddr
// gets a TCP-connect reachability probe. Latest result, time, latency and
// consecutive failures show in Status. Decisions that depend on a probe
// (promotion, standby lost) re-run it first rather than trust a cached
// result. Probe intervals lie within 100 ms..1 h and timeouts within
// 10 ms..interval (see ValidateProbeTiming); specs outside are refused.
//
// # Limits
//
// The arbiter tracks at most Config.MaxGuests guests (default 1024;
// unenrolled and recovering ones count) and refuses new ones beyond with
// ErrLimit, as it does a Suspend longer than Config.MaxSuspend.
//
// # Wire protocol
//
// Each message is a 4-byte big-endian length followed by that many bytes
// of JSON (at most MaxFrame, 1 MiB). Requests carry {"v": ProtocolVersion, "id",
// "op", "agent", "guest", "epoch", ...}; the response carries the same v
// and id and either a result or {"error": {"code", "message",
// "current_epoch", "role", "retry_after"}}. A request of another version
// is answered with code "version" naming both versions, and the
// connection is closed. TLS 1.3 with client certificates verified against
// the configured CA is mandatory.
//
// # State directory
//
// StateDir/guests/<guest>.json holds one record per guest, replaced by
// write-temp, fsync, rename, fsync of the directory. Directories the
// arbiter creates are fsynced with their parent. StateDir/LOCK is held
// (flock) while a server runs. A corrupt record stops the arbiter from
// starting instead of silently forgetting an epoch.
package arbiter
