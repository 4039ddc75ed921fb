package main

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/arbiter/heartbeat"
	"github.com/remora-ha/remora/internal/pki"
)

// ArbiterEnvPrefix prefixes environment overrides: REMORA_ARBITER_LEASE_DURATION,
// REMORA_ARBITER_TLS_CERT, ... (dots in keys become underscores). The
// ARBITER part keeps them apart from the agent's REMORA_* settings.
const ArbiterEnvPrefix = "REMORA_ARBITER"

// arbiterConfig is the arbiter's configuration file (see configs/arbiter.yaml).
type arbiterConfig struct {
	Listen        string          `mapstructure:"listen"`
	StateDir      string          `mapstructure:"state_dir"`
	TLS           TLSConfig       `mapstructure:"tls"`
	LeaseDuration time.Duration   `mapstructure:"lease_duration"`
	Heartbeat     HeartbeatConfig `mapstructure:"heartbeat"`
	Probe         ProbeDefaults   `mapstructure:"probe"`
	MaxSuspend    time.Duration   `mapstructure:"max_suspend"`
	MaxGuests     int             `mapstructure:"max_guests"`
	Guests        []GuestConfig   `mapstructure:"guests"`
	LogLevel      string          `mapstructure:"log_level"`
	LogFormat     string          `mapstructure:"log_format"`
	// MetricsListen serves Prometheus metrics at /metrics (plain HTTP);
	// empty: none.
	MetricsListen string `mapstructure:"metrics_listen"`
}

type TLSConfig struct {
	Cert string `mapstructure:"cert"`
	Key  string `mapstructure:"key"`
	CA   string `mapstructure:"ca"`
}

type HeartbeatConfig struct {
	Interval time.Duration `mapstructure:"interval"`
	Missed   int           `mapstructure:"missed"`
}

type ProbeDefaults struct {
	Interval time.Duration `mapstructure:"interval"`
	Timeout  time.Duration `mapstructure:"timeout"`
}

type GuestConfig struct {
	Name    string        `mapstructure:"name"`
	Service ServiceConfig `mapstructure:"service"`
}

type ServiceConfig struct {
	Kind         string        `mapstructure:"kind"`
	Address      string        `mapstructure:"address"`
	Send         string        `mapstructure:"send"`
	ExpectPrefix string        `mapstructure:"expect_prefix"`
	ExpectRegexp string        `mapstructure:"expect_regexp"`
	Interval     time.Duration `mapstructure:"interval"`
	Timeout      time.Duration `mapstructure:"timeout"`
}

// arbiterDefaults is the configuration used where a key is not set.
func arbiterDefaults() arbiterConfig {
	return arbiterConfig{
		Listen:        "0.0.0.0:7410",
		StateDir:      "/var/lib/remora/arbiter",
		TLS:           TLSConfig{Cert: "/etc/remora/pki/arbiter.crt", Key: "/etc/remora/pki/arbiter.key", CA: "/etc/remora/pki/ca.crt"},
		LeaseDuration: arbiter.DefaultLeaseDuration,
		Heartbeat:     HeartbeatConfig{Interval: heartbeat.DefaultInterval, Missed: heartbeat.DefaultMissed},
		Probe:         ProbeDefaults{Interval: arbiter.DefaultProbeInterval, Timeout: arbiter.DefaultProbeTimeout},
		MaxSuspend:    arbiter.DefaultMaxSuspend,
		MaxGuests:     arbiter.DefaultMaxGuests,
		LogLevel:      "info",
		LogFormat:     "text",
	}
}

// loadArbiterConfig reads the arbiter's configuration the way every
// remora config is read (see loadConfig) and checks it.
func loadArbiterConfig(cmd *cobra.Command, path string) (*arbiterConfig, error) {
	c := arbiterDefaults()
	if err := loadConfig(cmd, path, ArbiterEnvPrefix, &c); err != nil {
		return nil, err
	}
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("config %s: %w", orDefault(path, "(defaults)"), err)
	}
	return &c, nil
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func (c *arbiterConfig) validate() error {
	var errs []error
	need := func(key, val string) {
		if val == "" {
			errs = append(errs, fmt.Errorf("%s must be set", key))
		}
	}
	need("listen", c.Listen)
	need("state_dir", c.StateDir)
	need("tls.cert", c.TLS.Cert)
	need("tls.key", c.TLS.Key)
	need("tls.ca", c.TLS.CA)
	if c.LeaseDuration <= 0 {
		errs = append(errs, errors.New("lease_duration must be positive"))
	}
	if c.Heartbeat.Interval <= 0 || c.Heartbeat.Missed <= 0 {
		errs = append(errs, errors.New("heartbeat.interval and heartbeat.missed must be positive"))
	}
	if err := arbiter.ValidateProbeTiming(c.Probe.Interval, c.Probe.Timeout); err != nil {
		errs = append(errs, err)
	}
	if c.MaxSuspend <= 0 {
		errs = append(errs, errors.New("max_suspend must be positive"))
	}
	if c.MaxGuests <= 0 {
		errs = append(errs, errors.New("max_guests must be positive"))
	}
	if _, err := c.logLevel(); err != nil {
		errs = append(errs, err)
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("log_format %q unknown: use text or json", c.LogFormat))
	}
	seen := map[string]bool{}
	for i, g := range c.Guests {
		if !pki.ValidName(g.Name) {
			errs = append(errs, fmt.Errorf("guests[%d]: invalid name %q", i, g.Name))
			continue
		}
		if seen[g.Name] {
			errs = append(errs, fmt.Errorf("guests[%d]: guest %s listed twice", i, g.Name))
		}
		seen[g.Name] = true
		if err := g.Service.spec().Validate(); err != nil {
			errs = append(errs, fmt.Errorf("guests[%d] (%s): %w", i, g.Name, err))
		}
	}
	return errors.Join(errs...)
}

func (c *arbiterConfig) logLevel() (slog.Level, error) { return parseLogLevel(c.LogLevel) }

func (s ServiceConfig) spec() arbiter.ProbeSpec {
	return arbiter.ProbeSpec{
		Kind:         arbiter.ProbeKind(s.Kind),
		Address:      s.Address,
		Send:         s.Send,
		ExpectPrefix: s.ExpectPrefix,
		ExpectRegexp: s.ExpectRegexp,
		Interval:     s.Interval,
		Timeout:      s.Timeout,
	}
}

// serverConfig translates the file into an arbiter.Config (without TLS,
// logger and clock).
func (c *arbiterConfig) serverConfig() arbiter.Config {
	services := map[string]arbiter.ProbeSpec{}
	for _, g := range c.Guests {
		if g.Service.Kind != "" {
			services[g.Name] = g.Service.spec()
		}
	}
	return arbiter.Config{
		StateDir:      c.StateDir,
		LeaseDuration: c.LeaseDuration,
		Heartbeat:     heartbeat.Config{Interval: c.Heartbeat.Interval, Missed: c.Heartbeat.Missed},
		ProbeInterval: c.Probe.Interval,
		ProbeTimeout:  c.Probe.Timeout,
		MaxSuspend:    c.MaxSuspend,
		MaxGuests:     c.MaxGuests,
		Services:      services,
	}
}
