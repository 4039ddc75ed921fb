package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/remora-ha/remora/internal/agent"
)

type pflagFlag = pflag.Flag

func newAgentCmd(v *viper.Viper) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the agent of this host: protect enrolled guests, keep replicas of others",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadAgentConfig(cmd, v)
			if err != nil {
				return err
			}
			a, err := agent.New(cfg, newLogger(cfg.LogLevel))
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.Run(ctx)
		},
	}
	d := agent.Defaults()
	f := cmd.Flags()
	f.String("agent-id", "", "unique name of this host's agent")
	f.String("listen", d.Listen, "replication address (host:port)")
	f.String("state-dir", d.StateDir, "durable state (guest records)")
	f.String("runtime-dir", d.RuntimeDir, "sockets and staged epochs (tmpfs)")
	f.String("libvirt-uri", d.LibvirtURI, "libvirt connection URI")
	f.Duration("epoch-interval", d.EpochInterval, "time between checkpoints")
	f.Int("max-in-flight", d.MaxInFlight, "captured epochs not yet acknowledged before capture waits")
	f.String("tracker", d.Tracker, "dirty page tracker: auto, scan or softdirty")
	f.String("shell-suffix", "", "suffix of standby shell domain names (set when both hosts share one libvirt)")
	f.String("log-level", d.LogLevel, "debug, info, warn or error")
	f.String("arbiter", "", "arbiter address (host:port); empty: failover by hand only")
	f.String("advertise", "", "replication address other agents reach this one at")
	f.String("tls-cert", "", "this agent's certificate (its name is agent_id)")
	f.String("tls-key", "", "this agent's key")
	f.String("tls-ca", "", "the CA that signs every peer")
	f.Duration("heartbeat-interval", d.HeartbeatInterval, "failure detector interval")
	f.Int("heartbeat-missed", d.HeartbeatMissed, "intervals without a frame before the primary is suspected")
	f.String("api-listen", "", "also serve the admin API over TCP with mutual TLS (host:port)")
	_ = time.Second
	return cmd
}
