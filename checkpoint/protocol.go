package checkpoint

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/remora-ha/remora/internal/names"
)

// Hello opens a replication session for one guest.
type Hello struct {
	Agent      string `json:"agent"`      // the primary agent's id
	Guest      string `json:"guest"`      // the guest's name on the primary
	Generation string `json:"generation"` // changes whenever the primary's tracking restarts
	RAMBytes   int64  `json:"ram_bytes"`
	PageSize   int    `json:"page_size"`
	DomainXML  string `json:"domain_xml"` // migratable XML the shell is derived from
	// ShellBase is what the standby names its shell after: the domain name
	// without the primary's own shell suffix, so that a guest protected
	// back after a failover does not grow a suffix per failover.
	ShellBase string `json:"shell_base,omitempty"`
	// Disks are the guest disks mirrored to the standby, which keeps a
	// replica image of each and gives it to the shell.
	Disks []DiskSpec `json:"disks,omitempty"`
	// Home is the agent the guest was first enrolled from: failback
	// returns it there, whichever host runs it meanwhile.
	Home string `json:"home,omitempty"`
}

// MaxDisks bounds the disks of one guest a standby replicates.
const MaxDisks = 32

// validate checks every name in h against the one validator of wire
// names: they become file names on the standby.
func (h *Hello) validate() error {
	errs := []error{names.Agent("agent", h.Agent), names.Guest("guest", h.Guest)}
	if h.ShellBase != "" {
		errs = append(errs, names.Guest("shell name", h.ShellBase))
	}
	if h.Home != "" {
		errs = append(errs, names.Agent("home", h.Home))
	}
	if len(h.Disks) > MaxDisks {
		errs = append(errs, fmt.Errorf("%d disks: a standby replicates at most %d per guest", len(h.Disks), MaxDisks))
	}
	seen := map[string]bool{}
	for _, d := range h.Disks {
		errs = append(errs, names.Dev("disk", d.Dev))
		if d.Size <= 0 || d.Size > 64<<40 {
			errs = append(errs, fmt.Errorf("disk %q: size %d out of range (1 byte to 64 TiB)", d.Dev, d.Size))
		}
		if seen[d.Dev] {
			errs = append(errs, fmt.Errorf("disk %q listed twice", d.Dev))
		}
		seen[d.Dev] = true
	}
	if h.RAMBytes < 0 || h.RAMBytes > 16<<40 {
		errs = append(errs, fmt.Errorf("ram_bytes %d out of range", h.RAMBytes))
	}
	return errors.Join(errs...)
}

func (d *DiskHello) validate() error {
	return errors.Join(names.Agent("agent", d.Agent), names.Guest("guest", d.Guest), names.Dev("disk", d.Dev))
}

func (r *Restarting) validate() error {
	return errors.Join(names.Agent("agent", r.Agent), names.Guest("guest", r.Guest))
}

// Move asks the peer agent for a planned role move of one guest
// (FrameMove), answered with a welcome once it is done, or an error.
type Move struct {
	Agent string `json:"agent"` // the asking agent
	Guest string `json:"guest"`
	// Kind MoveTakeOver: the primary (Agent) stopped the guest, its final
	// checkpoint Epoch is acknowledged and the arbiter made the standby
	// primary at Fence: the standby restores the guest and runs it.
	// Kind MoveFailback: the standby (Agent), the guest's home, asks its
	// primary to switch the guest over to it.
	Kind  string `json:"kind"`
	Epoch uint64 `json:"epoch,omitempty"`
	Fence uint64 `json:"fence,omitempty"`
}

// Move kinds.
const (
	MoveTakeOver = "take-over"
	MoveFailback = "failback"
)

func (m *Move) validate() error {
	errs := []error{names.Agent("agent", m.Agent), names.Guest("guest", m.Guest)}
	switch {
	case m.Kind == MoveTakeOver && (m.Epoch == 0 || m.Fence == 0):
		errs = append(errs, fmt.Errorf("take-over without its checkpoint epoch and fencing epoch"))
	case m.Kind != MoveTakeOver && m.Kind != MoveFailback:
		errs = append(errs, fmt.Errorf("unknown move %q", m.Kind))
	}
	return errors.Join(errs...)
}

// DiskSpec is one replicated guest disk.
type DiskSpec struct {
	Dev  string `json:"dev"`  // libvirt target dev, e.g. vda
	Size int64  `json:"size"` // bytes
}

// DiskHello opens a disk connection (FrameDiskNBD or FrameDiskControl).
type DiskHello struct {
	Agent string `json:"agent"`
	Guest string `json:"guest"`
	Dev   string `json:"dev"`
	// Reset (control only): a new mirror starts; the replica image holds
	// no consistent state until the next full epoch commits.
	Reset bool `json:"reset,omitempty"`
}

// Restarting tells a standby that the guest's primary agent is stopping
// on purpose (an upgrade, a restart) and will be back within Grace: the
// silence that follows is not a failure to promote on. The guest's output
// stays held meanwhile.
type Restarting struct {
	Agent string        `json:"agent"`
	Guest string        `json:"guest"`
	Grace time.Duration `json:"grace_ns"`
}

// Welcome answers Hello with what the standby already holds, so a
// reconnect can resume instead of copying all RAM again.
type Welcome struct {
	Agent      string `json:"agent"`
	Generation string `json:"generation"`
	Committed  uint64 `json:"committed"`
	// Hashes, when not zero, is the number of page hashes (PageHash of
	// every page of the replica's RAM) the standby sends next, in
	// FramePageHashes frames: its replica is a complete checkpoint of
	// another primary generation (the primary's agent restarted), and the
	// first epoch need only carry the pages that differ (EpochBegin.Base).
	Hashes uint64 `json:"hashes,omitempty"`
	// AckWindowMs is this standby's promise: it resumes the guest (fails
	// over) no sooner than this long after it committed the last epoch it
	// acknowledged or sent this welcome. So an acknowledgement releases
	// output only if it came within this long of its epoch's last frame
	// going out (of the hello, for the epochs this welcome reports
	// committed); a later one
	// may come from a standby already running the guest, and the output
	// stays held. 0: no promise (every acknowledgement releases).
	AckWindowMs int64 `json:"ack_window_ms,omitempty"`
}

// MaxHashesPerFrame bounds the page hashes in one FramePageHashes frame.
const MaxHashesPerFrame = MaxFramePayload / 8 / 2

// AppendPageHashes encodes hashes as a FramePageHashes payload.
func AppendPageHashes(b []byte, hashes []uint64) []byte {
	for _, h := range hashes {
		b = binary.BigEndian.AppendUint64(b, h)
	}
	return b
}

// DecodePageHashes decodes a FramePageHashes payload onto into.
func DecodePageHashes(into []uint64, payload []byte) ([]uint64, error) {
	if len(payload)%8 != 0 {
		return into, fmt.Errorf("protocol error: page hashes frame of %d bytes, not a multiple of 8", len(payload))
	}
	for i := 0; i < len(payload); i += 8 {
		into = append(into, binary.BigEndian.Uint64(payload[i:]))
	}
	return into, nil
}

// ErrorMsg is sent before closing a session the peer must not retry as is.
type ErrorMsg struct {
	Error string `json:"error"`
	Fatal bool   `json:"fatal"` // retrying will not help until an admin acts
}

// EpochBegin announces an epoch's contents.
type EpochBegin struct {
	Full bool `json:"full"` // every page of guest RAM follows
	// Base: the pages that differ from the replica's RAM as its hashes
	// said follow (a new primary generation resyncing): a complete
	// checkpoint once applied, like a full epoch.
	Base        bool   `json:"base,omitempty"`
	Pages       uint64 `json:"pages"`
	DevStateLen uint64 `json:"devstate_len"`
	// DevStateBase, when not zero, is the epoch (of this generation)
	// whose device state the chunks are a delta against: byte i sent is
	// byte i of this epoch's XOR byte i of that one's (zero past its
	// end). Device state barely changes between epochs, so the delta is
	// mostly zeros and compresses to little.
	DevStateBase uint64 `json:"devstate_base,omitempty"`
}

// EpochEnd closes an epoch: the receiver commits only if everything it got
// matches these counts and this checksum.
type EpochEnd struct {
	Pages       uint64
	Batches     uint32
	DevStateLen uint64
	CRC         uint32 // CRC32C over every pages and devstate payload, in order
	// DevStateCRC is the CRC32C of the epoch's whole device state, so a
	// standby that rebuilt it from a delta knows it got it right.
	DevStateCRC uint32
}

const epochEndLen = 28

func (e EpochEnd) Marshal() []byte {
	b := make([]byte, 0, epochEndLen)
	b = binary.BigEndian.AppendUint64(b, e.Pages)
	b = binary.BigEndian.AppendUint32(b, e.Batches)
	b = binary.BigEndian.AppendUint64(b, e.DevStateLen)
	b = binary.BigEndian.AppendUint32(b, e.CRC)
	return binary.BigEndian.AppendUint32(b, e.DevStateCRC)
}

func UnmarshalEpochEnd(b []byte) (EpochEnd, error) {
	if len(b) != epochEndLen {
		return EpochEnd{}, fmt.Errorf("epoch-end trailer is %d bytes, want %d", len(b), epochEndLen)
	}
	return EpochEnd{
		Pages:       binary.BigEndian.Uint64(b[0:]),
		Batches:     binary.BigEndian.Uint32(b[8:]),
		DevStateLen: binary.BigEndian.Uint64(b[12:]),
		CRC:         binary.BigEndian.Uint32(b[20:]),
		DevStateCRC: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// WriteJSON sends v as the payload of a frame.
func WriteJSON(w io.Writer, t FrameType, fence, epoch uint64, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return WriteFrame(w, Frame{Type: t, Fence: fence, Epoch: epoch, Payload: b})
}

// ReadJSON reads one frame of type want into v. A FrameError from the peer
// becomes a *PeerError.
func ReadJSON(r io.Reader, want FrameType, v any) (Frame, error) {
	f, err := ReadFrame(r)
	if err != nil {
		return f, err
	}
	if f.Type == FrameError {
		return f, peerError(f)
	}
	if f.Type != want {
		return f, fmt.Errorf("protocol error: got %s frame, want %s", f.Type, want)
	}
	if err := json.Unmarshal(f.Payload, v); err != nil {
		return f, fmt.Errorf("protocol error: bad %s payload: %w", want, err)
	}
	return f, nil
}

// PeerError is an error the peer reported before closing the session.
type PeerError struct{ ErrorMsg }

func (e *PeerError) Error() string { return "peer: " + e.ErrorMsg.Error }

func peerError(f Frame) error {
	var m ErrorMsg
	if err := json.Unmarshal(f.Payload, &m); err != nil {
		m.Error = fmt.Sprintf("unreadable error frame (%v)", err)
	}
	return &PeerError{m}
}
