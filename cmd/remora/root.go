package main

import (
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"slices"
	"strings"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/cobra"
	"github.com/spf13/viper"

	"github.com/remora-ha/remora/internal/agent"
)

func newRootCmd() *cobra.Command {
	v := viper.New()
	root := &cobra.Command{
		Use:           "remora",
		Short:         "Keep a hot standby of running libvirt/QEMU guests",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().String("config", "", "agent config file (YAML); default /etc/remora/agent.yaml if it exists")
	root.PersistentFlags().String("socket", "", "the agent's API socket (overrides api_socket)")
	root.AddCommand(newAgentCmd(v), newVMCmd(v))
	root.AddCommand(extraCommands()...)
	return root
}

// extraCommands are subcommands defined in other packages.
var extraCommands = func() []*cobra.Command { return nil }

// agentKeys lists every agent config key with its flag name.
func agentKeys() []string {
	t := reflect.TypeOf(agent.Config{})
	keys := make([]string, 0, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		keys = append(keys, t.Field(i).Tag.Get("mapstructure"))
	}
	return keys
}

// loadAgentConfig merges defaults, the config file, REMORA_* environment and
// flags (in rising priority) and rejects keys it does not know.
func loadAgentConfig(cmd *cobra.Command, v *viper.Viper) (agent.Config, error) {
	def := agent.Defaults()
	var defMap map[string]any
	if err := mapstructure.Decode(def, &defMap); err != nil {
		return def, err
	}
	for k, val := range defMap {
		v.SetDefault(k, val)
	}
	v.SetDefault("agent_id", "")
	v.SetDefault("shell_suffix", "")
	v.SetEnvPrefix("REMORA")
	v.SetEnvKeyReplacer(strings.NewReplacer("-", "_"))
	v.AutomaticEnv()
	known := agentKeys()
	cmd.Flags().VisitAll(func(f *pflagFlag) {
		key := strings.ReplaceAll(f.Name, "-", "_")
		if slices.Contains(known, key) {
			_ = v.BindPFlag(key, f)
		}
	})
	if s, _ := cmd.Flags().GetString("socket"); s != "" {
		v.Set("api_socket", s)
	}
	path, _ := cmd.Flags().GetString("config")
	if path == "" {
		if _, err := os.Stat("/etc/remora/agent.yaml"); err == nil {
			path = "/etc/remora/agent.yaml"
		}
	}
	if path != "" {
		v.SetConfigFile(path)
		if err := v.ReadInConfig(); err != nil {
			return def, fmt.Errorf("config file %s: %w", path, err)
		}
		for _, k := range v.AllKeys() {
			if !slices.Contains(known, k) {
				return def, fmt.Errorf("config file %s: unknown key %q (known keys: %s)", path, k, strings.Join(known, ", "))
			}
		}
	}
	var cfg agent.Config
	hook := mapstructure.ComposeDecodeHookFunc(mapstructure.StringToTimeDurationHookFunc())
	if err := v.UnmarshalExact(&cfg, viper.DecodeHook(hook)); err != nil {
		return def, fmt.Errorf("configuration: %w", err)
	}
	return cfg, nil
}

func newLogger(level string) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		l = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}
