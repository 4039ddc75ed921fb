package main

import (
	"bytes"
	"strings"
	"testing"
)

// A wrong command line fails with the usage of the command it meant.
func TestWrongCommandLineShowsUsage(t *testing.T) {
	for _, tc := range []struct {
		args      []string
		err, path string
	}{
		{[]string{"bogus"}, `unknown command "bogus" for "remora"`, "remora [command]"},
		{[]string{"vm", "bogus"}, `unknown command "bogus" for "remora vm"`, "remora vm [command]"},
		{[]string{"vm"}, "remora vm needs a command", "remora vm [command]"},
		{[]string{"txlog", "verfiy", "/x"}, `unknown command "verfiy" for "remora txlog"`, "remora txlog [command]"},
		{[]string{"vm", "status", "a", "b"}, "accepts at most 1 arg(s), received 2", "remora vm status [GUEST]"},
		{[]string{"vm", "status", "--nope"}, "unknown flag: --nope", "remora vm status [GUEST]"},
		{[]string{"host", "drian"}, `unknown command "drian" for "remora host"`, "remora host [command]"},
		{[]string{"vm", "switchover"}, "accepts 1 arg(s), received 0", "remora vm switchover GUEST"},
	} {
		root := newRootCmd()
		var stderr bytes.Buffer
		root.SetErr(&stderr)
		root.SetOut(&stderr)
		root.SetArgs(tc.args)
		err := root.Execute()
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%v: err %v, want %q", tc.args, err, tc.err)
		}
		if !strings.Contains(stderr.String(), "Usage:") || !strings.Contains(stderr.String(), tc.path) {
			t.Errorf("%v: no usage of %q on stderr:\n%s", tc.args, tc.path, stderr.String())
		}
	}
	// Control: a right one prints no usage.
	root := newRootCmd()
	var out bytes.Buffer
	root.SetErr(&out)
	root.SetOut(&out)
	root.SetArgs([]string{"version"})
	if err := root.Execute(); err != nil || strings.Contains(out.String(), "Usage:") {
		t.Fatalf("version: %v\n%s", err, out.String())
	}
}
