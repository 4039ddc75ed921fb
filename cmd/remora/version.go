package main

import (
	"fmt"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
)

// version is set at build time (-ldflags "-X main.version=1.2.3"); else
// the module's version, or the VCS revision it was built from.
var version = ""

func buildVersion() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "+dirty"
			}
		}
	}
	if v != "" && v != "(devel)" {
		return v
	}
	if rev != "" {
		return "devel-" + rev[:min(12, len(rev))] + dirty
	}
	return "devel"
}

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print remora's version and the protocol versions it speaks",
		Long: "Print remora's version and the protocol versions it speaks. Agents replicate " +
			"to each other only at the same replication protocol version, and talk to an arbiter " +
			"only at the same arbiter protocol version: upgrade both hosts to one release.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			bi, _ := debug.ReadBuildInfo()
			goVersion := "unknown"
			if bi != nil {
				goVersion = bi.GoVersion
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "remora %s\n", buildVersion())
			fmt.Fprintf(w, "replication protocol %d\n", checkpoint.ProtocolVersion)
			fmt.Fprintf(w, "arbiter protocol %d\n", arbiter.ProtocolVersion)
			fmt.Fprintf(w, "built with %s\n", goVersion)
			return nil
		},
	}
}
