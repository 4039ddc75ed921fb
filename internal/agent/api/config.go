package api

import (
	"errors"
	"fmt"
	"net"
	"path"
	"path/filepath"
	"slices"
	"time"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/names"
)

// Config is the agent's configuration (configs/agent.yaml).
type Config struct {
	AgentID       string        `mapstructure:"agent_id"`
	Listen        string        `mapstructure:"listen"`
	APISocket     string        `mapstructure:"api_socket"`
	StateDir      string        `mapstructure:"state_dir"`
	RuntimeDir    string        `mapstructure:"runtime_dir"`
	LibvirtURI    string        `mapstructure:"libvirt_uri"`
	EpochInterval time.Duration `mapstructure:"epoch_interval"`
	// EpochMinInterval: while the guest has output held, checkpoint this
	// soon after the last checkpoint began instead of at the next tick
	// (replies wait for a pause and a round trip, not for the interval).
	// 0, or not below epoch_interval: checkpoints only every interval.
	EpochMinInterval time.Duration `mapstructure:"epoch_min_interval"`
	MaxInFlight      int           `mapstructure:"max_in_flight"`
	Tracker          string        `mapstructure:"tracker"`
	ShellSuffix      string        `mapstructure:"shell_suffix"`
	// Reprotect: auto protects a guest failed over to this host onto the
	// standby the arbiter names (its old primary's agent, once back);
	// manual waits for `remora vm reprotect`.
	Reprotect string `mapstructure:"reprotect"`
	LogLevel  string `mapstructure:"log_level"`
	LogFormat string `mapstructure:"log_format"` // text or json
	// MetricsListen serves Prometheus metrics at /metrics on host:port
	// (plain HTTP, read only); empty: none.
	MetricsListen string `mapstructure:"metrics_listen"`

	// Arbiter is the arbiter's host:port; empty means no automatic
	// failover (vm failover by hand only).
	Arbiter string `mapstructure:"arbiter"`
	// Advertise is the replication address others reach this agent at
	// (default: listen, when it names a host).
	Advertise string `mapstructure:"advertise"`
	// Mutual TLS for replication and the arbiter: this agent's certificate
	// (its name is the agent id), key, and the CA that signs every peer.
	TLSCert string `mapstructure:"tls_cert"`
	TLSKey  string `mapstructure:"tls_key"`
	TLSCA   string `mapstructure:"tls_ca"`
	// Failure detector between primary and standby: the standby suspects
	// the primary after heartbeat_missed intervals without a frame.
	HeartbeatInterval time.Duration `mapstructure:"heartbeat_interval"`
	HeartbeatMissed   int           `mapstructure:"heartbeat_missed"`
	// APIListen serves the admin API over TCP with mutual TLS as well
	// (host:port); clients present a certificate signed by tls_ca.
	APIListen string `mapstructure:"api_listen"`
	// OutputCommit holds each guest's network output until the standby
	// acknowledged the epoch that produced it: auto, qemu, plug or off.
	OutputCommit string `mapstructure:"output_commit"`
	// OutputBufferBytes bounds the output held per guest; frames beyond it
	// are dropped (the guest's TCP sends them again).
	OutputBufferBytes int64 `mapstructure:"output_buffer_bytes"`
	// RestartGrace is how long a standby and the arbiter wait for a
	// primary's agent that stops on purpose (SIGTERM: an upgrade) before
	// they treat its silence as a failure. A host that dies within it is
	// failed over only once it has run out.
	RestartGrace time.Duration `mapstructure:"restart_grace"`

	// InsecurePlaintext runs without TLS: replication, the arbiter and the
	// TCP admin API unauthenticated. For a closed lab only.
	InsecurePlaintext bool `mapstructure:"insecure_plaintext"`
	// ArbiterName is the name the arbiter's certificate must carry.
	ArbiterName string `mapstructure:"arbiter_name"`
	// AcceptPrimaries and AcceptGuests restrict which primary agents (by
	// certificate name) and which guests this agent keeps replicas of;
	// empty accepts any agent of the CA and any guest.
	AcceptPrimaries []string `mapstructure:"accept_primaries"`
	AcceptGuests    []string `mapstructure:"accept_guests"`
	// MaxReplicas bounds the replicas this agent keeps as a standby.
	MaxReplicas int `mapstructure:"max_replicas"`
	// APIGroup is a group whose members may use the admin socket besides
	// root; APIAdmins are the certificate names the TCP admin API obeys.
	APIGroup  string   `mapstructure:"api_group"`
	APIAdmins []string `mapstructure:"api_admins"`
	// BootDirs are the directories a standby shell may take firmware,
	// kernels and initrds from (the primary's XML names them; empty: the
	// distributions' firmware directories and /var/lib/libvirt/boot).
	BootDirs []string `mapstructure:"boot_dirs"`
}

// Output-commit backends (config output_commit).
const (
	OutputAuto = "auto" // the kernel's plug qdisc where it has one, else QEMU
	OutputQEMU = "qemu" // filter-redirector in QEMU: no kernel feature needed
	OutputPlug = "plug" // sch_plug on an ifb device
	OutputOff  = "off"  // output flows at once: no Remus guarantee
)

// Log levels accepted in configuration.
var LogLevels = []string{"debug", "info", "warn", "error"}

// Re-protection policies (reprotect:).
const (
	ReprotectAuto   = "auto"
	ReprotectManual = "manual"
)

// Defaults returns the configuration used where a key is not set.
func Defaults() Config {
	return Config{
		Listen:           "0.0.0.0:7400",
		APISocket:        "/run/remora/agent.sock",
		StateDir:         "/var/lib/remora",
		RuntimeDir:       "/run/remora",
		LibvirtURI:       "qemu:///system",
		EpochInterval:    100 * time.Millisecond,
		EpochMinInterval: 20 * time.Millisecond,
		MaxInFlight:      3,
		Tracker:          checkpoint.TrackerAuto,
		Reprotect:        ReprotectAuto,
		LogLevel:         "info",
		LogFormat:        "text",

		HeartbeatInterval: 100 * time.Millisecond,
		HeartbeatMissed:   5,

		OutputCommit:      OutputAuto,
		OutputBufferBytes: 16 << 20,
		RestartGrace:      30 * time.Second,

		ArbiterName: "arbiter",
		MaxReplicas: 64,
		APIAdmins:   []string{"admin"},
	}
}

// HeartbeatTimeout is the silence after which a peer is suspected.
func (c *Config) HeartbeatTimeout() time.Duration {
	return c.HeartbeatInterval * time.Duration(c.HeartbeatMissed)
}

// insecureHelp says how to set up TLS, or to opt out of it.
func (c *Config) insecureHelp() string {
	return fmt.Sprintf("make the cluster's certificates with `remora certs cluster /etc/remora/pki --agent %s=IP ...` and set the tls_cert, tls_key and tls_ca lines it prints, or set insecure_plaintext: true (unauthenticated: a closed lab only)", c.AgentID)
}

// TLS reports whether mutual TLS is configured.
func (c *Config) TLS() bool { return c.TLSCert != "" }

// AcceptsPrimary reports whether agent may keep a replica of guest here.
func (c *Config) AcceptsPrimary(agent, guest string) error {
	if len(c.AcceptPrimaries) > 0 && !slices.Contains(c.AcceptPrimaries, agent) {
		return fmt.Errorf("agent %q is not in this standby's accept_primaries %v", agent, c.AcceptPrimaries)
	}
	if len(c.AcceptGuests) == 0 {
		return nil
	}
	for _, p := range c.AcceptGuests {
		if ok, _ := path.Match(p, guest); ok {
			return nil
		}
	}
	return fmt.Errorf("guest %q matches none of this standby's accept_guests %v", guest, c.AcceptGuests)
}

// Validate checks the configuration and says how to fix what is wrong.
func (c *Config) Validate() error {
	if c.AgentID == "" {
		return fmt.Errorf("agent_id is not set: give each host's agent a unique name (e.g. agent_id: host-a)")
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("listen %q: %v (want host:port, e.g. 0.0.0.0:7400)", c.Listen, err)
	}
	if c.EpochInterval < 5*time.Millisecond || c.EpochInterval > time.Minute {
		return fmt.Errorf("epoch_interval %s out of range: use 5ms to 1m (Remus uses 25ms-200ms)", c.EpochInterval)
	}
	if c.EpochMinInterval < 0 || c.EpochMinInterval > time.Minute {
		return fmt.Errorf("epoch_min_interval %s out of range: use 0 (off) to 1m", c.EpochMinInterval)
	}
	if c.MaxInFlight < 1 || c.MaxInFlight > 64 {
		return fmt.Errorf("max_in_flight %d out of range: use 1 to 64", c.MaxInFlight)
	}
	switch c.Tracker {
	case checkpoint.TrackerAuto, checkpoint.TrackerScan, checkpoint.TrackerSoftDirty:
	case "colo":
		return errors.New("tracker colo is not offered: QEMU 7.2's COLO checkpointing deadlocks under TCG (its checkpoint syncs the dirty log without QEMU's global lock) and remora does not drive it yet; use auto (softdirty where the kernel has CONFIG_MEM_SOFT_DIRTY, else scan)")
	default:
		return fmt.Errorf("tracker %q unknown: use auto, scan or softdirty", c.Tracker)
	}
	switch c.Reprotect {
	case ReprotectAuto, ReprotectManual:
	default:
		return fmt.Errorf("reprotect %q unknown: use auto or manual", c.Reprotect)
	}
	switch c.OutputCommit {
	case OutputAuto, OutputQEMU, OutputPlug, OutputOff:
	default:
		return fmt.Errorf("output_commit %q unknown: use auto, qemu, plug or off", c.OutputCommit)
	}
	if c.OutputBufferBytes < 64<<10 {
		return fmt.Errorf("output_buffer_bytes %d too small: use at least 65536 (default 16777216)", c.OutputBufferBytes)
	}
	if c.RestartGrace < 0 || c.RestartGrace > 5*time.Minute {
		return fmt.Errorf("restart_grace %s out of range: use 0 (no grace: a stopping agent's guests fail over) to 5m", c.RestartGrace)
	}
	if !validLogLevel(c.LogLevel) {
		return fmt.Errorf("log_level %q unknown: use debug, info, warn or error", c.LogLevel)
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		return fmt.Errorf("log_format %q unknown: use text or json", c.LogFormat)
	}
	tlsSet := 0
	for _, f := range []string{c.TLSCert, c.TLSKey, c.TLSCA} {
		if f != "" {
			tlsSet++
		}
	}
	if tlsSet != 0 && tlsSet != 3 {
		return fmt.Errorf("tls_cert, tls_key and tls_ca go together: set all three (make them with `remora certs init DIR` and `remora certs issue %s --dir DIR`)", c.AgentID)
	}
	switch {
	case tlsSet == 0 && !c.InsecurePlaintext:
		return fmt.Errorf("no TLS configured: replication would accept any peer; %s", c.insecureHelp())
	case tlsSet == 3 && c.InsecurePlaintext:
		return fmt.Errorf("insecure_plaintext is set together with tls_cert/tls_key/tls_ca: remove one of the two")
	}
	if !names.ValidAgent(c.AgentID) {
		return fmt.Errorf("agent_id %q: %s", c.AgentID, names.AgentRule)
	}
	if !names.ValidAgent(c.ArbiterName) {
		return fmt.Errorf("arbiter_name %q: %s", c.ArbiterName, names.AgentRule)
	}
	for _, p := range append(slices.Clone(c.AcceptPrimaries), c.APIAdmins...) {
		if !names.ValidAgent(p) {
			return fmt.Errorf("accept_primaries/api_admins entry %q: %s", p, names.AgentRule)
		}
	}
	for _, g := range c.AcceptGuests {
		if _, err := path.Match(g, "x"); err != nil {
			return fmt.Errorf("accept_guests pattern %q: %v (shell patterns: web-*, db?)", g, err)
		}
	}
	for _, d := range c.BootDirs {
		if !filepath.IsAbs(d) || filepath.Clean(d) != d || d == "/" {
			return fmt.Errorf("boot_dirs entry %q: want an absolute, clean directory other than / (e.g. /var/lib/libvirt/boot)", d)
		}
	}
	if c.MaxReplicas < 1 || c.MaxReplicas > 4096 {
		return fmt.Errorf("max_replicas %d out of range: use 1 to 4096", c.MaxReplicas)
	}
	if c.Arbiter != "" {
		if _, _, err := net.SplitHostPort(c.Arbiter); err != nil {
			return fmt.Errorf("arbiter %q: %v (want host:port, e.g. 10.0.0.9:7410)", c.Arbiter, err)
		}
		if tlsSet == 0 {
			return fmt.Errorf("arbiter is set but tls_cert/tls_key/tls_ca are not: the arbiter only speaks mutual TLS")
		}
	}
	if c.APIListen != "" {
		if _, _, err := net.SplitHostPort(c.APIListen); err != nil {
			return fmt.Errorf("api_listen %q: %v (want host:port)", c.APIListen, err)
		}
		if tlsSet == 0 {
			return fmt.Errorf("api_listen is set but tls_cert/tls_key/tls_ca are not: the admin API is only served over mutual TLS")
		}
	}
	if c.HeartbeatInterval < 10*time.Millisecond || c.HeartbeatMissed < 2 {
		return fmt.Errorf("heartbeat_interval %s / heartbeat_missed %d too small: use at least 10ms and 2", c.HeartbeatInterval, c.HeartbeatMissed)
	}
	if c.Advertise == "" {
		if host, _, _ := net.SplitHostPort(c.Listen); host != "" && !net.ParseIP(host).IsUnspecified() {
			c.Advertise = c.Listen
		}
	}
	for k, v := range map[string]string{"state_dir": c.StateDir, "runtime_dir": c.RuntimeDir, "api_socket": c.APISocket, "libvirt_uri": c.LibvirtURI} {
		if v == "" {
			return fmt.Errorf("%s is empty", k)
		}
	}
	return nil
}

func validLogLevel(l string) bool {
	for _, v := range LogLevels {
		if l == v {
			return true
		}
	}
	return false
}
