package main

import (
	"fmt"
	"reflect"
	"time"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/internal/agent/api"
)

// agentFlagUsage documents the flag of every agent config key.
var agentFlagUsage = map[string]string{
	"agent_id":            "unique name of this host's agent",
	"listen":              "replication address (host:port)",
	"api_socket":          "the admin API's unix socket",
	"state_dir":           "durable state (guest records, journal, replica images)",
	"runtime_dir":         "sockets and staged epochs (tmpfs)",
	"libvirt_uri":         "libvirt connection URI",
	"epoch_interval":      "time between checkpoints",
	"epoch_min_interval":  "with guest output held, checkpoint this soon after the last one instead of at the next interval (0: off)",
	"max_in_flight":       "captured epochs not yet acknowledged before capture waits",
	"tracker":             "dirty page tracker: auto, scan or softdirty",
	"shell_suffix":        "suffix of standby shell domain names (set when both hosts share one libvirt)",
	"reprotect":           "after a failover to this host: auto protects the guest onto the standby the arbiter names (its old primary, once back), manual waits for `remora vm reprotect`",
	"log_level":           "debug, info, warn or error",
	"log_format":          "text or json (one object per line)",
	"metrics_listen":      "serve Prometheus metrics at /metrics on host:port (plain HTTP); empty: none",
	"arbiter":             "arbiter address (host:port); empty: failover by hand only",
	"advertise":           "replication address other agents reach this one at",
	"tls_cert":            "this agent's certificate (its name is agent_id)",
	"tls_key":             "this agent's key",
	"tls_ca":              "the CA that signs every peer",
	"heartbeat_interval":  "failure detector interval",
	"heartbeat_missed":    "intervals without a frame before the primary is suspected",
	"api_listen":          "also serve the admin API over TCP with mutual TLS (host:port)",
	"output_commit":       "hold guest output until its epoch is acknowledged: auto, qemu, plug or off",
	"output_buffer_bytes": "output held per guest before frames are dropped",
	"restart_grace":       "how long the standby and arbiter wait for an agent that stops on purpose (an upgrade) before failing its guests over",
	"insecure_plaintext":  "run without TLS: every port unauthenticated (a closed lab only)",
	"arbiter_name":        "the name the arbiter's certificate must carry",
	"accept_primaries":    "primary agents (certificate names) this agent keeps replicas for; empty: any agent of the CA",
	"accept_guests":       "guest name patterns this agent keeps replicas of; empty: any",
	"max_replicas":        "most replicas this agent keeps as a standby",
	"api_group":           "a group whose members may use the admin socket besides root",
	"api_admins":          "certificate names the TCP admin API obeys",
	"boot_dirs":           "directories a standby shell may take firmware, kernels and initrds from; empty: the distributions' firmware directories and /var/lib/libvirt/boot",
}

// addAgentFlags gives cmd a flag for every agent config key, defaulting to
// the agent's defaults.
func addAgentFlags(cmd *cobra.Command) {
	d := reflect.ValueOf(api.Defaults())
	t := d.Type()
	f := cmd.Flags()
	for i := range t.NumField() {
		key := t.Field(i).Tag.Get("mapstructure")
		usage, ok := agentFlagUsage[key]
		if !ok {
			panic(fmt.Sprintf("agent config key %s has no flag usage", key))
		}
		name := flagName(key)
		switch v := d.Field(i).Interface().(type) {
		case string:
			f.String(name, v, usage)
		case time.Duration:
			f.Duration(name, v, usage)
		case int:
			f.Int(name, v, usage)
		case int64:
			f.Int64(name, v, usage)
		case bool:
			f.Bool(name, v, usage)
		case []string:
			f.StringSlice(name, v, usage)
		default:
			panic(fmt.Sprintf("agent config key %s: no flag for %T", key, v))
		}
	}
}

// loadAgentConfig reads the agent's configuration the way every remora
// config is read (see loadConfig): --config or /etc/remora/agent.yaml,
// REMORA_* variables, flags; --socket overrides api_socket.
func loadAgentConfig(cmd *cobra.Command) (api.Config, error) {
	cfg := api.Defaults()
	if err := loadConfig(cmd, configPath(cmd, "/etc/remora/agent.yaml"), "REMORA", &cfg); err != nil {
		return cfg, err
	}
	if s, _ := cmd.Flags().GetString("socket"); s != "" {
		cfg.APISocket = s
	}
	return cfg, nil
}
