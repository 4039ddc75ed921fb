package main

import (
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
	root.AddCommand(newAgentCmd(), newVMCmd(), arbiterCmd(), certsCmd(), newTxlogCmd(), versionCmd(), docsCmd())
	return root
}
