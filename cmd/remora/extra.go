package main

import (
	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/internal/arbitercli"
)

func init() {
	extraCommands = func() []*cobra.Command {
		return arbitercli.Commands()
	}
}
