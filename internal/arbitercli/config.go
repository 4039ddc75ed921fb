package arbitercli

import (
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/viper"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/arbiter/heartbeat"
	"github.com/remora-ha/remora/internal/pki"
)

// EnvPrefix prefixes environment overrides: REMORA_ARBITER_LEASE_DURATION,
// REMORA_ARBITER_TLS_CERT, ... (dots in keys become underscores). The
// ARBITER part keeps them apart from the agent's REMORA_* settings.
const EnvPrefix = "REMORA_ARBITER"

// Config is the arbiter's configuration file (see configs/arbiter.yaml).
type Config struct {
	Listen        string          `mapstructure:"listen"`
	StateDir      string          `mapstructure:"state_dir"`
	TLS           TLSConfig       `mapstructure:"tls"`
	LeaseDuration time.Duration   `mapstructure:"lease_duration"`
	Heartbeat     HeartbeatConfig `mapstructure:"heartbeat"`
	Probe         ProbeDefaults   `mapstructure:"probe"`
	Guests        []GuestConfig   `mapstructure:"guests"`
	LogLevel      string          `mapstructure:"log_level"`
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

var defaults = map[string]any{
	"listen":             "0.0.0.0:7410",
	"state_dir":          "/var/lib/remora/arbiter",
	"tls.cert":           "/etc/remora/pki/arbiter.crt",
	"tls.key":            "/etc/remora/pki/arbiter.key",
	"tls.ca":             "/etc/remora/pki/ca.crt",
	"lease_duration":     arbiter.DefaultLeaseDuration,
	"heartbeat.interval": heartbeat.DefaultInterval,
	"heartbeat.missed":   heartbeat.DefaultMissed,
	"probe.interval":     arbiter.DefaultProbeInterval,
	"probe.timeout":      arbiter.DefaultProbeTimeout,
	"log_level":          "info",
}

// flagKeys maps command-line flags to config keys.
var flagKeys = map[string]string{
	"listen":         "listen",
	"state-dir":      "state_dir",
	"lease-duration": "lease_duration",
	"log-level":      "log_level",
}

// loadConfig merges, from lowest to highest precedence: defaults, the
// YAML file named by --config, REMORA_ARBITER_* variables, and flags that
// were set. Unknown keys in the file are an error naming the key.
func loadConfig(cmd *cobra.Command, path string) (*Config, error) {
	v := viper.New()
	for k, val := range defaults {
		v.SetDefault(k, val)
	}
	v.SetEnvPrefix(EnvPrefix)
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	if path != "" {
		v.SetConfigFile(path)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
	}
	for flag, key := range flagKeys {
		if f := cmd.Flags().Lookup(flag); f != nil {
			if err := v.BindPFlag(key, f); err != nil {
				return nil, err
			}
		}
	}
	var c Config
	if err := v.UnmarshalExact(&c); err != nil {
		return nil, fmt.Errorf("config %s: %s", orDefault(path, "(defaults)"), unknownKeys(err))
	}
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("config %s: %w", orDefault(path, "(defaults)"), err)
	}
	return &c, nil
}

var invalidKeysRE = regexp.MustCompile(`'([^']*)' has invalid keys: (.*)`)

// unknownKeys turns mapstructure's "'tls' has invalid keys: foo" into
// "unknown key tls.foo".
func unknownKeys(err error) string {
	var out []string
	for _, m := range invalidKeysRE.FindAllStringSubmatch(err.Error(), -1) {
		for _, k := range strings.Split(m[2], ", ") {
			k = strings.TrimSpace(k)
			if m[1] != "" {
				k = m[1] + "." + k
			}
			out = append(out, k)
		}
	}
	if len(out) == 0 {
		// Drop mapstructure's multi-line preamble.
		msg := strings.TrimPrefix(err.Error(), "decoding failed due to the following error(s):")
		return strings.Join(strings.Fields(strings.ReplaceAll(msg, "\n", " ")), " ")
	}
	if len(out) == 1 {
		return "unknown key " + out[0]
	}
	return "unknown keys " + strings.Join(out, ", ")
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func (c *Config) validate() error {
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
	if c.Probe.Interval <= 0 || c.Probe.Timeout <= 0 {
		errs = append(errs, errors.New("probe.interval and probe.timeout must be positive"))
	}
	if _, err := c.logLevel(); err != nil {
		errs = append(errs, err)
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

func (c *Config) logLevel() (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return 0, fmt.Errorf("log_level %q: want debug, info, warn or error", c.LogLevel)
	}
	return l, nil
}

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
func (c *Config) serverConfig() arbiter.Config {
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
		Services:      services,
	}
}
