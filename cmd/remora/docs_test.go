package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestDocsCoverEveryCommand(t *testing.T) {
	dir := t.TempDir()
	root := newRootCmd()
	if err := writeDocs(root, dir); err != nil {
		t.Fatal(err)
	}
	for _, c := range root.Commands() {
		if c.Hidden || !c.IsAvailableCommand() {
			continue
		}
		page := filepath.Join(dir, "man1", "remora-"+c.Name()+".1")
		b, err := os.ReadFile(page)
		if err != nil {
			t.Errorf("no man page for remora %s: %v", c.Name(), err)
			continue
		}
		if !strings.Contains(string(b), ".SH NAME") {
			t.Errorf("%s is not a man page", page)
		}
	}
	agent, err := os.ReadFile(filepath.Join(dir, "man1", "remora-agent.1"))
	if err != nil || !strings.Contains(string(agent), "--epoch-interval") {
		t.Errorf("remora-agent.1 does not document --epoch-interval: %v", err)
	}
	for _, f := range []string{"remora.bash", "_remora", "remora.fish"} {
		if st, err := os.Stat(filepath.Join(dir, "completion", f)); err != nil || st.Size() == 0 {
			t.Errorf("completion %s: %v", f, err)
		}
	}
}
