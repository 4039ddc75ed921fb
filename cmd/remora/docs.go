package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// docsCmd writes what a package installs from the command tree itself,
// so man pages and completions never drift from the flags.
func docsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:    "docs DIR",
		Short:  "Write man pages (DIR/man1) and shell completions (DIR/completion) generated from the commands",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return writeDocs(cmd.Root(), args[0])
		},
	}
	return cmd
}

func writeDocs(root *cobra.Command, dir string) error {
	man := filepath.Join(dir, "man1")
	comp := filepath.Join(dir, "completion")
	for _, d := range []string{man, comp} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	root.DisableAutoGenTag = true // reproducible pages: no generation date
	hdr := &doc.GenManHeader{Title: "REMORA", Section: "1", Source: "remora " + buildVersion(), Manual: "remora manual"}
	if err := doc.GenManTree(root, hdr, man); err != nil {
		return fmt.Errorf("man pages: %w", err)
	}
	for name, gen := range map[string]func(string) error{
		"remora.bash": func(p string) error { return root.GenBashCompletionFileV2(p, true) },
		"_remora":     root.GenZshCompletionFile,
		"remora.fish": func(p string) error { return root.GenFishCompletionFile(p, true) },
	} {
		if err := gen(filepath.Join(comp, name)); err != nil {
			return fmt.Errorf("completion %s: %w", name, err)
		}
	}
	return nil
}
