//go:build cgo

package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/internal/agent"
	"github.com/remora-ha/remora/internal/agent/api"
)

func newAgentCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the agent of this host: protect enrolled guests, keep replicas of others",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadAgentConfig(cmd)
			if err != nil {
				return err
			}
			if err := cfg.Validate(); err != nil {
				return err
			}
			log, err := newLogger(cfg.LogLevel, cfg.LogFormat, os.Stderr)
			if err != nil {
				return err
			}
			a, err := agent.New(cfg, log)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.Run(ctx)
		},
	}
	addAgentFlags(cmd)
	return cmd
}

// libvirtHookCmd is what libvirt's qemu hook runs (packaged as
// /etc/libvirt/hooks/qemu.d/50-remora): it refuses to start a stale copy
// of a guest that was failed over, whoever asks (virsh start, autostart).
func libvirtHookCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "libvirt-hook DOMAIN OPERATION SUB-OPERATION [EXTRA]",
		Short: "libvirt's qemu hook: refuse to start a superseded copy of a protected guest",
		Long: `Install as a libvirt qemu hook (the package puts it in /etc/libvirt/hooks/qemu.d/50-remora;
libvirtd finds new hooks at its start). Before a domain starts ("prepare begin"), it
refuses a guest this host's agent protects as primary when a failover moved it
elsewhere, or when the arbiter cannot confirm this host still runs it.`,
		Args: cobra.RangeArgs(3, 4),
		RunE: func(cmd *cobra.Command, args []string) error {
			if args[1] != "prepare" || args[2] != "begin" {
				return nil
			}
			cfg, err := loadAgentConfig(cmd)
			if err != nil {
				// Every guest of the host starts through here: a broken
				// remora config must not stop the others. Its records
				// are still read where the defaults put them.
				fmt.Fprintf(cmd.ErrOrStderr(), "remora: %v (using the default state_dir)\n", err)
				cfg = api.Defaults()
			}
			// libvirt writes the domain's XML to the hook's stdin.
			x, _ := io.ReadAll(io.LimitReader(cmd.InOrStdin(), 16<<20))
			return agent.CheckStart(cmd.Context(), cfg, args[0], string(x))
		},
	}
}
