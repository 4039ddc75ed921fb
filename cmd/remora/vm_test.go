package main

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/remora-ha/remora/internal/agent/api"
)

// `remora vm failover <TAB>` offers the guests this agent keeps replicas
// of, `vm unenroll <TAB>` every guest, asked over the agent's socket;
// never file names.
func TestVMGuestCompletion(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/vms" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode([]api.VMStatus{
			{Guest: "web1", Role: api.RolePrimary}, {Guest: "web2", Role: api.RoleStandby}, {Guest: "db1", Role: api.RoleStandby},
		})
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	complete := func(args ...string) string {
		root := newRootCmd()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetArgs(append([]string{"__complete", "--socket", sock}, args...))
		if err := root.Execute(); err != nil {
			t.Fatal(err)
		}
		return out.String()
	}
	for _, c := range []struct {
		args []string
		want []string
		not  []string
	}{
		{[]string{"vm", "failover", ""}, []string{"web2", "db1"}, []string{"web1"}},
		{[]string{"vm", "failover", "w"}, []string{"web2"}, []string{"db1", "web1"}},
		{[]string{"vm", "unenroll", ""}, []string{"web1", "web2", "db1"}, nil},
	} {
		got := complete(c.args...)
		lines := strings.Split(strings.TrimSpace(got), "\n")
		if last := lines[len(lines)-1]; last != ":4" { // ShellCompDirectiveNoFileComp
			t.Errorf("%v: directive %q, want :4 (no file names)", c.args, last)
		}
		for _, w := range c.want {
			if !strings.Contains(got, w+"\n") {
				t.Errorf("%v: %q not offered:\n%s", c.args, w, got)
			}
		}
		for _, n := range c.not {
			if strings.Contains(got, n+"\n") {
				t.Errorf("%v: %q offered:\n%s", c.args, n, got)
			}
		}
	}
}
