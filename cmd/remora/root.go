package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "remora",
		Short:         "Keep a hot standby of running libvirt/QEMU guests",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().String("config", "", "agent config file (YAML); default /etc/remora/agent.yaml if it exists")
	root.PersistentFlags().String("socket", "", "the agent's API socket (overrides api_socket)")
	root.AddCommand(newAgentCmd(), newVMCmd(), newHostCmd(), arbiterCmd(), certsCmd(), newTxlogCmd(), versionCmd(), docsCmd(), libvirtHookCmd())
	root.SetFlagErrorFunc(usageError)
	strictUsage(root)
	return root
}

// strictUsage makes a wrong command line exit non-zero with the usage of
// the command it was meant for: an unknown or missing subcommand (cobra
// prints help and exits 0 for a group) and arguments a command refuses.
func strictUsage(c *cobra.Command) {
	for _, sub := range c.Commands() {
		strictUsage(sub)
	}
	if c.HasSubCommands() && c.Run == nil && c.RunE == nil {
		c.Args = cobra.ArbitraryArgs
		c.RunE = func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError(cmd, fmt.Errorf("unknown command %q for %q", args[0], cmd.CommandPath()))
			}
			return usageError(cmd, fmt.Errorf("%s needs a command", cmd.CommandPath()))
		}
		return
	}
	if check := c.Args; check != nil {
		c.Args = func(cmd *cobra.Command, args []string) error {
			if err := check(cmd, args); err != nil {
				return usageError(cmd, err)
			}
			return nil
		}
	}
}

// usageError prints cmd's usage to stderr and returns err for main to print.
func usageError(cmd *cobra.Command, err error) error {
	cmd.PrintErrln(cmd.UsageString())
	return err
}
