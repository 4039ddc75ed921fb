package main

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
)

func TestVersionNamesTheProtocols(t *testing.T) {
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs([]string{"version"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{
		"remora ",
		fmt.Sprintf("replication protocol %d\n", checkpoint.ProtocolVersion),
		fmt.Sprintf("arbiter protocol %d\n", arbiter.ProtocolVersion),
		"built with go",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("version output lacks %q:\n%s", want, got)
		}
	}
	root.SetArgs([]string{"version", "extra"})
	if err := root.Execute(); err == nil {
		t.Error("version with an argument was accepted")
	}
}
