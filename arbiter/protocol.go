package arbiter

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"time"
)

// ProtocolVersion is carried in every request and response. A server
// answers a request of another version with CodeVersion and closes the
// connection; a client refuses any response of another version.
const ProtocolVersion = 1

// MaxFrame bounds a frame's JSON body; larger frames are a protocol error.
const MaxFrame = 1 << 20

// Operations.
const (
	opRegister    = "register"
	opRenew       = "renew"
	opSuspend     = "suspend"
	opRelease     = "release"
	opPromote     = "promote"
	opStandbyLost = "standby_lost"
	opHandover    = "handover"
	opSynced      = "synced"
	opRetire      = "retire"
	opHeartbeat   = "heartbeat"
	opStatus      = "status"
)

// request is one frame from client to server. Agent is the identity the
// caller claims; the server checks it against the TLS certificate.
type request struct {
	V        int               `json:"v"`
	ID       uint64            `json:"id"`
	Op       string            `json:"op"`
	Agent    string            `json:"agent,omitempty"`
	Guest    string            `json:"guest,omitempty"`
	Epoch    uint64            `json:"epoch"`
	Spec     *GuestSpec        `json:"spec,omitempty"`
	Standby  string            `json:"standby,omitempty"`
	Epochs   map[string]uint64 `json:"epochs,omitempty"`
	Duration time.Duration     `json:"duration,omitempty"` // suspend
}

// response answers the request with the same ID; Err is set on refusal.
type response struct {
	V            int           `json:"v"`
	ID           uint64        `json:"id"`
	Err          *Error        `json:"error,omitempty"`
	Lease        *Lease        `json:"lease,omitempty"`
	Grant        *Grant        `json:"grant,omitempty"`
	Registration *Registration `json:"registration,omitempty"`
	Assignments  []Assignment  `json:"assignments,omitempty"`
	// SuspectAfterMs (heartbeat answers): how long the arbiter waits
	// without an agent's heartbeat before it may promote that agent's
	// standbys, so a primary can pause its guest first.
	SuspectAfterMs int64   `json:"suspect_after_ms,omitempty"`
	Status         *Status `json:"status,omitempty"`
}

// writeFrame sends a 4-byte big-endian length followed by the JSON body,
// in one Write so a frame is never split across TLS records needlessly.
func writeFrame(w io.Writer, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(body) > MaxFrame {
		return fmt.Errorf("frame of %d bytes exceeds limit %d", len(body), MaxFrame)
	}
	buf := make([]byte, 4+len(body))
	binary.BigEndian.PutUint32(buf, uint32(len(body)))
	copy(buf[4:], body)
	_, err = w.Write(buf)
	return err
}

func readFrame(r io.Reader) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > MaxFrame {
		return nil, fmt.Errorf("frame of %d bytes exceeds limit %d", n, MaxFrame)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF // a header without its body is a cut frame, not a clean close
		}
		return nil, err
	}
	return body, nil
}

// peekVersion reads only the version so frames of other versions, whose
// shape may differ, still get a clear answer.
func peekVersion(body []byte) (int, error) {
	var v struct {
		V int `json:"v"`
	}
	err := json.Unmarshal(body, &v)
	return v.V, err
}
