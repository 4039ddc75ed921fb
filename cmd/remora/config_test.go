package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remora-ha/remora/internal/agent/api"
)

func loadFrom(t *testing.T, yaml string, env map[string]string, flags ...string) (string, error) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
	cmd := newAgentCmd()
	cmd.Flags().String("config", "", "")
	cmd.Flags().String("socket", "", "")
	if err := cmd.Flags().Parse(append([]string{"--config", p}, flags...)); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadAgentConfig(cmd)
	if err != nil {
		return "", err
	}
	return cfg.AgentID + " " + cfg.EpochInterval.String() + " " + cfg.Listen, nil
}

func TestAgentConfigPrecedence(t *testing.T) {
	got, err := loadFrom(t, "agent_id: a\nepoch_interval: 50ms\n", nil)
	if err != nil || got != "a 50ms 0.0.0.0:7400" {
		t.Fatalf("file: %q %v", got, err)
	}
	got, err = loadFrom(t, "agent_id: a\nepoch_interval: 50ms\n", map[string]string{"REMORA_EPOCH_INTERVAL": "30ms"})
	if err != nil || got != "a 30ms 0.0.0.0:7400" {
		t.Fatalf("environment over file: %q %v", got, err)
	}
	got, err = loadFrom(t, "agent_id: a\nepoch_interval: 50ms\n", map[string]string{"REMORA_EPOCH_INTERVAL": "30ms"}, "--epoch-interval", (20 * time.Millisecond).String())
	if err != nil || got != "a 20ms 0.0.0.0:7400" {
		t.Fatalf("flag over environment: %q %v", got, err)
	}
}

func TestAgentConfigUnknownKey(t *testing.T) {
	_, err := loadFrom(t, "agent_id: a\nepoch_intervall: 50ms\n", nil)
	if err == nil || !strings.Contains(err.Error(), `unknown key "epoch_intervall"`) {
		t.Fatalf("want the unknown key named, got %v", err)
	}
}

func TestAgentConfigMalformed(t *testing.T) {
	_, err := loadFrom(t, "agent_id: [unterminated\n", nil)
	if err == nil || !strings.Contains(err.Error(), "agent.yaml") {
		t.Fatalf("want an error naming the file, got %v", err)
	}
	_, err = loadFrom(t, "agent_id: a\nepoch_interval: soon\n", nil)
	if err == nil {
		t.Fatal("a bad duration was accepted")
	}
}

func TestParseProbe(t *testing.T) {
	for _, ok := range []string{"", "tcp:10.0.0.1:80", "line:10.0.0.1:7000:get:"} {
		if _, err := parseProbe(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"tcp:10.0.0.1", "udp:1.2.3.4:5", "line:1.2.3.4:5:get", "tcp:host:port"} {
		if _, err := parseProbe(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// configFrom loads the agent configuration yaml, unvalidated.
func configFrom(t *testing.T, yaml string) api.Config {
	t.Helper()
	cmd := newAgentCmd()
	cmd.Flags().String("config", "", "")
	cmd.Flags().String("socket", "", "")
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Flags().Parse([]string{"--config", p}); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadAgentConfig(cmd)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestAgentConfigBadLogLevel(t *testing.T) {
	cfg := configFrom(t, "agent_id: a\nlog_level: loud\n")
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), `log_level "loud"`) {
		t.Fatalf("bad log level: %v", err)
	}
	if _, err := newLogger("loud", "text", os.Stderr); err == nil {
		t.Fatal("newLogger took a bad level")
	}
}

// log_format json writes one JSON object per line; an unknown format is
// refused with the choices.
func TestLogFormat(t *testing.T) {
	var b strings.Builder
	l, err := newLogger("info", "json", &b)
	if err != nil {
		t.Fatal(err)
	}
	l.Info("guest state changed", "guest", "web1")
	var rec map[string]any
	if err := json.Unmarshal([]byte(b.String()), &rec); err != nil || rec["msg"] != "guest state changed" || rec["guest"] != "web1" {
		t.Fatalf("json log line %q: %v", b.String(), err)
	}
	cmd := newAgentCmd()
	cmd.Flags().String("config", "", "")
	cmd.Flags().String("socket", "", "")
	if err := cmd.Flags().Parse([]string{"--log-format", "xml", "--agent-id", "a"}); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadAgentConfig(cmd)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), `log_format "xml" unknown: use text or json`) {
		t.Fatalf("bad log format: %v", err)
	}
	if _, err := newLogger("info", "xml", os.Stderr); err == nil {
		t.Fatal("newLogger took a bad format")
	}
}

func TestEveryAgentKeyHasAFlag(t *testing.T) {
	cmd := newAgentCmd()
	for _, k := range []string{"output-commit", "output-buffer-bytes", "api-socket", "tls-ca"} {
		if cmd.Flags().Lookup(k) == nil {
			t.Errorf("no --%s", k)
		}
	}
	got, err := loadFrom(t, "agent_id: a\n", nil, "--output-commit", "off")
	if err != nil || got == "" {
		t.Fatal(got, err)
	}
}

func loadConfigFile(t *testing.T, p string, flags ...string) (api.Config, error) {
	t.Helper()
	cmd := newAgentCmd()
	cmd.Flags().String("config", "", "")
	cmd.Flags().String("socket", "", "")
	if err := cmd.Flags().Parse(append([]string{"--config", p}, flags...)); err != nil {
		t.Fatal(err)
	}
	return loadAgentConfig(cmd)
}

func TestAgentRequiresTLS(t *testing.T) {
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte("agent_id: host-a\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfigFile(t, p)
	if err != nil {
		t.Fatal(err)
	}
	err = cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "remora certs cluster") || !strings.Contains(err.Error(), "insecure_plaintext: true") {
		t.Fatalf("an agent without TLS: %v", err)
	}
	cfg, err = loadConfigFile(t, p, "--insecure-plaintext")
	if err != nil || cfg.Validate() != nil {
		t.Fatalf("insecure_plaintext opts out: %v %v", err, cfg.Validate())
	}
	for _, bad := range []string{"--agent-id=../x", "--arbiter-name=a/b", "--accept-primaries=host-b,..", "--accept-guests=[", "--max-replicas=0"} {
		cfg, err := loadConfigFile(t, p, "--insecure-plaintext", bad)
		if err == nil {
			err = cfg.Validate()
		}
		if err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

// The shipped example is a valid configuration and lists are flags too.
func TestShippedAgentConfig(t *testing.T) {
	cfg, err := loadConfigFile(t, "../../configs/agent.yaml", "--accept-primaries", "host-b,host-c")
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if !cfg.TLS() || cfg.InsecurePlaintext || len(cfg.APIAdmins) != 1 || len(cfg.AcceptPrimaries) != 2 {
		t.Fatalf("configs/agent.yaml: %+v", cfg)
	}
	if err := cfg.AcceptsPrimary("host-c", "web1"); err != nil {
		t.Fatal(err)
	}
	if err := cfg.AcceptsPrimary("host-d", "web1"); err == nil || !strings.Contains(err.Error(), "accept_primaries") {
		t.Fatalf("host-d: %v", err)
	}
}

// tracker colo is refused with the reason, not as an unknown word.
func TestAgentConfigTracker(t *testing.T) {
	for tracker, want := range map[string]string{
		"auto": "", "scan": "", "softdirty": "",
		"colo":  "deadlocks under TCG",
		"dirty": `tracker "dirty" unknown`,
	} {
		cfg := configFrom(t, "agent_id: a\ninsecure_plaintext: true\ntracker: "+tracker+"\n")
		err := cfg.Validate()
		if (want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), want)) {
			t.Errorf("tracker %s: %v, want %q", tracker, err, want)
		}
	}
}
