package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/cobra"
	"github.com/spf13/viper"
)

// One convention for every configuration file (agent and arbiter): keys
// are the mapstructure tags of the config struct (nested ones joined by
// dots: tls.cert), and a value comes from, in rising priority, the
// struct's defaults, the YAML file, the environment variable
// <PREFIX>_<KEY> (dots as underscores: REMORA_ARBITER_TLS_CERT) and the
// command-line flag named like the key with dashes (--tls-cert), when set.
// A key the struct does not know is an error that names it.

// loadConfig fills out, which holds the defaults, from path (none when
// empty), the environment and cmd's flags.
func loadConfig(cmd *cobra.Command, path, envPrefix string, out any) error {
	var defaults map[string]any
	if err := mapstructure.Decode(out, &defaults); err != nil {
		return err
	}
	keys := flatKeys("", defaults)
	v := viper.New()
	for _, k := range keys {
		v.SetDefault(k.name, k.value)
	}
	v.SetEnvPrefix(envPrefix)
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_", "-", "_"))
	v.AutomaticEnv()
	known := make([]string, 0, len(keys))
	for _, k := range keys {
		known = append(known, k.name)
		if f := cmd.Flags().Lookup(flagName(k.name)); f != nil {
			if err := v.BindPFlag(k.name, f); err != nil {
				return err
			}
		}
	}
	where := "(defaults)"
	if path != "" {
		where = path
		v.SetConfigFile(path)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return fmt.Errorf("config file %s: %w", path, err)
		}
		for _, k := range v.AllKeys() {
			if !slices.Contains(known, k) && !underList(k, keys) {
				sort.Strings(known)
				return fmt.Errorf("config file %s: unknown key %q (known keys: %s)", path, k, strings.Join(known, ", "))
			}
		}
	}
	if err := v.UnmarshalExact(out); err != nil {
		return fmt.Errorf("config %s: %s", where, unknownKeys(err))
	}
	return nil
}

type configKey struct {
	name  string
	value any
	list  bool // a list of tables (arbiter guests): its items are checked by UnmarshalExact
}

func flatKeys(prefix string, m map[string]any) []configKey {
	var out []configKey
	for k, val := range m {
		name := prefix + k
		switch x := val.(type) {
		case map[string]any:
			out = append(out, flatKeys(name+".", x)...)
		default:
			out = append(out, configKey{name: name, value: val, list: val != nil && reflect.TypeOf(val).Kind() == reflect.Slice})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

func underList(key string, keys []configKey) bool {
	for _, k := range keys {
		if k.list && strings.HasPrefix(key, k.name+".") {
			return true
		}
	}
	return false
}

// flagName is the flag that sets key: state_dir -> state-dir, tls.cert -> tls-cert.
func flagName(key string) string {
	return strings.NewReplacer("_", "-", ".", "-").Replace(key)
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
		return fmt.Sprintf("unknown key %q", out[0])
	}
	return "unknown keys " + strings.Join(out, ", ")
}

// parseLogLevel is the log_level check of every config.
func parseLogLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil || strings.ContainsAny(s, "+-") {
		return 0, fmt.Errorf("log_level %q unknown: use debug, info, warn or error", s)
	}
	return l, nil
}

// newLogger is the one way remora's daemons log: slog, text, to w.
func newLogger(level, format string, w io.Writer) (*slog.Logger, error) {
	l, err := parseLogLevel(level)
	if err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "", "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log_format %q unknown: use text or json", format)
}

// configPath is --config, or def when that file exists.
func configPath(cmd *cobra.Command, def string) string {
	path, _ := cmd.Flags().GetString("config")
	if path == "" && def != "" {
		if _, err := os.Stat(def); err == nil {
			path = def
		}
	}
	return path
}
