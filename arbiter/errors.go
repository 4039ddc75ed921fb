package arbiter

import (
	"fmt"
	"time"
)

// Code identifies a class of arbiter error. Codes travel on the wire, so
// existing values must never change meaning.
type Code string

const (
	CodeStaleEpoch   Code = "stale_epoch"
	CodeEpochAhead   Code = "epoch_ahead"
	CodeUnknownGuest Code = "unknown_guest"
	CodeNotPrimary   Code = "not_primary"
	CodeNotStandby   Code = "not_standby"
	CodeNotInSync    Code = "not_in_sync"
	CodeLeaseValid   Code = "lease_valid"
	CodeServiceAlive Code = "service_alive"
	CodeConflict     Code = "conflict"
	CodeUnauthorized Code = "unauthorized"
	CodeBadRequest   Code = "bad_request"
	CodeVersion      Code = "version"
	CodeInternal     Code = "internal"
	CodeUnavailable  Code = "unavailable"
	CodeRecovering   Code = "recovering"
	CodeLimit        Code = "limit"
)

// Error is every error the arbiter or the client library returns for a
// request. Compare with errors.Is against the Err* sentinels; use errors.As
// to read the details (CurrentEpoch, Role, RetryAfter).
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message,omitempty"`

	// CurrentEpoch, Primary and Role are set for CodeStaleEpoch and
	// CodeEpochAhead: the guest's current epoch, its primary, and the
	// caller's role at that epoch. Role RoleNone means the caller's copy of
	// the guest is fenced off and must be destroyed.
	CurrentEpoch uint64 `json:"current_epoch,omitempty"`
	Primary      string `json:"primary,omitempty"`
	Role         Role   `json:"role,omitempty"`

	// RetryAfter is a hint for refusals that time may resolve, such as
	// the remaining lease for CodeLeaseValid or the rest of the recovery
	// window for CodeRecovering.
	RetryAfter time.Duration `json:"retry_after,omitempty"`

	cause error
}

func (e *Error) Error() string {
	if e.Message == "" {
		return "arbiter: " + string(e.Code)
	}
	return "arbiter: " + e.Message
}

// Is matches any *Error with the same Code, so errors.Is(err,
// ErrStaleEpoch) works for errors carrying details.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

// Unwrap exposes the transport error behind CodeUnavailable.
func (e *Error) Unwrap() error { return e.cause }

// Sentinels for errors.Is.
var (
	// ErrStaleEpoch: the request carried an epoch older than the guest's
	// current one; someone else was granted the guest since. Details in
	// Error.CurrentEpoch, Error.Primary and Error.Role.
	ErrStaleEpoch = &Error{Code: CodeStaleEpoch}
	// ErrEpochAhead: the request carried an epoch the arbiter never issued.
	// The caller or the arbiter's state is damaged; do not act on it.
	ErrEpochAhead = &Error{Code: CodeEpochAhead}
	// ErrUnknownGuest: no such guest is registered.
	ErrUnknownGuest = &Error{Code: CodeUnknownGuest}
	// ErrNotPrimary: the caller is not the guest's primary.
	ErrNotPrimary = &Error{Code: CodeNotPrimary}
	// ErrNotStandby: the caller (or named agent) is not the guest's
	// standby at the current epoch.
	ErrNotStandby = &Error{Code: CodeNotStandby}
	// ErrNotInSync: promotion refused because the standby is not in sync.
	ErrNotInSync = &Error{Code: CodeNotInSync}
	// ErrLeaseValid: promotion refused because the primary's lease has not
	// expired; Error.RetryAfter is the remaining lease.
	ErrLeaseValid = &Error{Code: CodeLeaseValid}
	// ErrServiceAlive: promotion refused because the guest's service still
	// answers from the arbiter's side of the network.
	ErrServiceAlive = &Error{Code: CodeServiceAlive}
	// ErrConflict: the request contradicts the current role assignment.
	ErrConflict = &Error{Code: CodeConflict}
	// ErrUnauthorized: the TLS identity does not match the claimed agent.
	ErrUnauthorized = &Error{Code: CodeUnauthorized}
	// ErrBadRequest: malformed request.
	ErrBadRequest = &Error{Code: CodeBadRequest}
	// ErrVersion: the peer speaks another protocol version.
	ErrVersion = &Error{Code: CodeVersion}
	// ErrInternal: the arbiter failed (for example, could not persist);
	// nothing was granted.
	ErrInternal = &Error{Code: CodeInternal}
	// ErrUnavailable: the arbiter could not be reached or the connection
	// failed mid-request; the outcome is unknown (retrying is safe: every
	// request is idempotent for the same epoch).
	ErrUnavailable = &Error{Code: CodeUnavailable}
	// ErrRecovering: the arbiter has no record of the guest while agents
	// hold epochs for it (its state was lost) and is collecting their
	// claims; nothing is granted until it has decided. Retry after
	// Error.RetryAfter.
	ErrRecovering = &Error{Code: CodeRecovering}
	// ErrLimit: a configured limit (max_guests, max_suspend) refuses the
	// request; the message names it.
	ErrLimit = &Error{Code: CodeLimit}
)

func errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}
