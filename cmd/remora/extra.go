package main

import (
	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/internal/arbitercli"
	"github.com/remora-ha/remora/internal/txlogcli"
)

func init() {
	extraCommands = func() []*cobra.Command {
		return append(arbitercli.Commands(), txlogcli.Command())
	}
}
