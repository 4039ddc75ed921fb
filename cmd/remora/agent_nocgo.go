//go:build !cgo

package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// Without cgo there is no libvirt binding: this binary serves a machine
// that runs no guests (the arbiter's) and talks to agents elsewhere.
func newAgentCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the agent of this host (not in this build: it has no libvirt)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return errors.New("this remora binary was built without cgo, so it has no libvirt binding and cannot run the agent: " +
				"build it on the hypervisor host with CGO_ENABLED=1 and libvirt-dev installed (make build)")
		},
	}
	addAgentFlags(cmd)
	return cmd
}

// libvirtHookCmd: a host without libvirt runs no guests to refuse.
func libvirtHookCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "libvirt-hook DOMAIN OPERATION SUB-OPERATION [EXTRA]",
		Short:  "libvirt's qemu hook (not in this build: it has no libvirt)",
		Hidden: true,
		Args:   cobra.RangeArgs(3, 4),
		RunE: func(*cobra.Command, []string) error {
			return errors.New("this remora binary was built without cgo: install the hypervisor host's build (make build) as the libvirt hook")
		},
	}
}
