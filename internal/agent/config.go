// Package agent is the remora agent: it protects guests on its host as a
// primary and keeps replicas of other hosts' guests as a standby.
package agent

import (
	"fmt"
	"net"
	"time"

	"github.com/remora-ha/remora/checkpoint"
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
	MaxInFlight   int           `mapstructure:"max_in_flight"`
	Tracker       string        `mapstructure:"tracker"`
	ShellSuffix   string        `mapstructure:"shell_suffix"`
	LogLevel      string        `mapstructure:"log_level"`
}

// Defaults returns the configuration used where a key is not set.
func Defaults() Config {
	return Config{
		Listen:        "0.0.0.0:7400",
		APISocket:     "/run/remora/agent.sock",
		StateDir:      "/var/lib/remora",
		RuntimeDir:    "/run/remora",
		LibvirtURI:    "qemu:///system",
		EpochInterval: 100 * time.Millisecond,
		MaxInFlight:   3,
		Tracker:       checkpoint.TrackerAuto,
		LogLevel:      "info",
	}
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
	if c.MaxInFlight < 1 || c.MaxInFlight > 64 {
		return fmt.Errorf("max_in_flight %d out of range: use 1 to 64", c.MaxInFlight)
	}
	switch c.Tracker {
	case checkpoint.TrackerAuto, checkpoint.TrackerScan, checkpoint.TrackerSoftDirty:
	default:
		return fmt.Errorf("tracker %q unknown: use auto, scan or softdirty", c.Tracker)
	}
	for k, v := range map[string]string{"state_dir": c.StateDir, "runtime_dir": c.RuntimeDir, "api_socket": c.APISocket, "libvirt_uri": c.LibvirtURI} {
		if v == "" {
			return fmt.Errorf("%s is empty", k)
		}
	}
	return nil
}
