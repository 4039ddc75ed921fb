package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

const mirrorTestQueryBlock = `{"return":[
 {"device":"","qdev":"/machine/peripheral/virtio-disk0/virtio-backend","inserted":{"node-name":"libvirt-2-format","file":"/img/a.img","drv":"raw","image":{"virtual-size":1048576}}},
 {"device":"","qdev":"/machine/peripheral/virtio-disk1/virtio-backend","inserted":{"node-name":"libvirt-1-format","file":"/img/b.img","drv":"qcow2","image":{"virtual-size":2097152}}}]}`

// fakeBlockQEMU answers the block commands a Mirror sends.
type fakeBlockQEMU struct {
	log      []string
	args     map[string]map[string]any
	jobs     string // query-block-jobs reply
	nodes    string // query-named-block-nodes reply
	failNext map[string]string
	onCancel func(*fakeBlockQEMU)
}

var _ qmp.Monitor = (*fakeBlockQEMU)(nil)

func (f *fakeBlockQEMU) Connect() error    { return nil }
func (f *fakeBlockQEMU) Disconnect() error { return nil }
func (f *fakeBlockQEMU) Events(context.Context) (<-chan qmp.Event, error) {
	return nil, errors.New("no events")
}

func (f *fakeBlockQEMU) Run(cmd []byte) ([]byte, error) {
	var c struct {
		Execute   string         `json:"execute"`
		Arguments map[string]any `json:"arguments"`
	}
	if err := json.Unmarshal(cmd, &c); err != nil {
		return nil, err
	}
	f.log = append(f.log, c.Execute)
	if f.args == nil {
		f.args = map[string]map[string]any{}
	}
	f.args[c.Execute] = c.Arguments
	if d, ok := f.failNext[c.Execute]; ok {
		delete(f.failNext, c.Execute)
		return []byte(fmt.Sprintf(`{"error":{"class":"GenericError","desc":%q}}`, d)), nil
	}
	switch c.Execute {
	case "query-block":
		return []byte(mirrorTestQueryBlock), nil
	case "query-block-jobs":
		return []byte(`{"return":[` + f.jobs + `]}`), nil
	case "query-named-block-nodes":
		return []byte(`{"return":[` + f.nodes + `]}`), nil
	case "block-job-cancel":
		if f.onCancel != nil {
			f.onCancel(f)
		}
	}
	return []byte(`{"return":{}}`), nil
}

func TestFindDiskNode(t *testing.T) {
	alias := "virtio-disk1"
	d, err := FindDiskNode(context.Background(), &fakeBlockQEMU{}, alias)
	if err != nil {
		t.Fatal(err)
	}
	if d.Node != "libvirt-1-format" || d.Size != 2<<20 || d.File != "/img/b.img" || d.Format != "qcow2" {
		t.Fatalf("%+v", d)
	}
	if _, err := FindDiskNode(context.Background(), &fakeBlockQEMU{}, "virtio-disk"); err == nil {
		t.Fatal("a prefix of an alias matched")
	}
}

func TestStartMirrorCommands(t *testing.T) {
	f := &fakeBlockQEMU{}
	disk := DiskNode{Target: "vdb", Node: "libvirt-1-format", Size: 2 << 20}
	mr, err := StartMirror(context.Background(), f, disk, MirrorOptions{Server: NBDServer{Host: "10.0.0.2", Port: 10809, Export: "g-vdb"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(f.log, ","); got != "blockdev-del,blockdev-add,blockdev-mirror" {
		t.Fatal(got)
	}
	if f.args["blockdev-del"]["node-name"] != "remora-nbd-vdb" {
		t.Fatalf("stale node removal: %v", f.args["blockdev-del"])
	}
	// A timed-out add left the node: the retry removes it first (a real
	// QEMU refuses a duplicate node name); no node left is fine too.
	f.log = nil
	f.failNext = map[string]string{"blockdev-del": "Failed to find node with node-name='remora-nbd-vdb'"}
	if _, err := StartMirror(context.Background(), f, disk, MirrorOptions{Server: NBDServer{Host: "10.0.0.2", Port: 10809, Export: "g-vdb"}}); err != nil {
		t.Fatalf("no stale node: %v", err)
	}
	add, mir := f.args["blockdev-add"], f.args["blockdev-mirror"]
	if add["driver"] != "nbd" || add["export"] != "g-vdb" || add["node-name"] != "remora-nbd-vdb" || add["reconnect-delay"] != 0.0 {
		t.Fatalf("blockdev-add %v", add)
	}
	if srv := add["server"].(map[string]any); srv["type"] != "inet" || srv["host"] != "10.0.0.2" || srv["port"] != "10809" {
		t.Fatalf("server %v", srv)
	}
	for k, v := range map[string]any{"device": "libvirt-1-format", "target": "remora-nbd-vdb", "sync": "full",
		"copy-mode": "write-blocking", "on-target-error": "report", "auto-dismiss": false, "job-id": "remora-mirror-vdb"} {
		if mir[k] != v {
			t.Errorf("blockdev-mirror %s = %v, want %v", k, mir[k], v)
		}
	}
	if mr.JobID != "remora-mirror-vdb" {
		t.Fatal(mr.JobID)
	}

	// A refused mirror removes the node it added.
	f = &fakeBlockQEMU{failNext: map[string]string{"blockdev-mirror": "Source and target image have different sizes"}}
	if _, err := StartMirror(context.Background(), f, disk, MirrorOptions{Server: NBDServer{Path: "/run/x.sock", Export: "e"}}); err == nil {
		t.Fatal("no error")
	}
	if got := strings.Join(f.log, ","); got != "blockdev-del,blockdev-add,blockdev-mirror,blockdev-del" {
		t.Fatal(got)
	}
	if _, err := StartMirror(context.Background(), f, disk, MirrorOptions{Server: NBDServer{Host: "h", Export: "e"}}); err == nil {
		t.Fatal("server without a port accepted")
	}
}

func TestMirrorSyncedAndWaitReady(t *testing.T) {
	ctx := context.Background()
	f := &fakeBlockQEMU{jobs: `{"device":"remora-mirror-vda","status":"running","ready":false,"offset":100,"len":1000,"io-status":"ok"}`}
	mr := &Mirror{mon: f, JobID: "remora-mirror-vda", TargetNode: "remora-nbd-vda"}
	if err := mr.CheckSynced(ctx); !errors.Is(err, ErrMirrorNotSynced) {
		t.Fatalf("running job: %v", err)
	}
	var seen []int64
	calls := 0
	err := mr.WaitReady(context.Background(), time.Millisecond, func(p MirrorProgress) {
		seen = append(seen, p.Offset)
		if calls++; calls == 3 {
			f.jobs = `{"device":"remora-mirror-vda","status":"ready","ready":true,"offset":1000,"len":1000,"io-status":"ok"}`
		}
	})
	if err != nil || len(seen) != 4 || seen[3] != 1000 {
		t.Fatal(err, seen)
	}
	if err := mr.CheckSynced(ctx); err != nil {
		t.Fatal(err)
	}
	f.jobs = `{"device":"remora-mirror-vda","status":"ready","ready":true,"offset":1000,"len":5096,"io-status":"ok"}`
	if err := mr.CheckSynced(ctx); !errors.Is(err, ErrMirrorNotSynced) || !strings.Contains(err.Error(), "4096 bytes") {
		t.Fatalf("failed target write: %v", err)
	}
	f.jobs = `{"device":"remora-mirror-vda","status":"concluded","offset":1000,"len":5096,"error":"Input/output error"}`
	if err := mr.WaitReady(context.Background(), time.Millisecond, nil); err == nil || !strings.Contains(err.Error(), "Input/output error") {
		t.Fatalf("concluded job: %v", err)
	}
	f.jobs = ""
	if err := mr.CheckSynced(ctx); !errors.Is(err, ErrMirrorNotSynced) {
		t.Fatalf("no job: %v", err)
	}
}

func TestMirrorCancel(t *testing.T) {
	f := &fakeBlockQEMU{jobs: `{"device":"remora-mirror-vda","status":"ready"}`}
	f.onCancel = func(f *fakeBlockQEMU) {
		f.jobs = `{"device":"remora-mirror-vda","status":"concluded","error":"Operation canceled"}`
	}
	mr := &Mirror{mon: f, JobID: "remora-mirror-vda", TargetNode: "remora-nbd-vda"}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := mr.Cancel(ctx); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(f.log, ","); got != "block-job-cancel,query-block-jobs,job-dismiss,blockdev-del" {
		t.Fatal(got)
	}
	if f.args["block-job-cancel"]["force"] != true {
		t.Fatal("cancel without force would wait for a final copy to the standby")
	}
	// Already gone: still succeeds.
	f = &fakeBlockQEMU{failNext: map[string]string{"blockdev-del": "Failed to find node with node-name='remora-nbd-vda'"}}
	mr.mon = f
	if err := mr.Cancel(ctx); err != nil {
		t.Fatal(err)
	}
}

// A restarted agent finds the mirrors its predecessor left: their jobs
// are cancelled and dismissed, their NBD nodes removed; the guest's own
// nodes and other jobs are left alone.
func TestRemoveStaleMirrors(t *testing.T) {
	f := &fakeBlockQEMU{
		jobs:  `{"device":"remora-mirror-vda","status":"concluded","error":"Input/output error"},{"device":"backup-0","status":"running"}`,
		nodes: `{"node-name":"remora-nbd-vdb"},{"node-name":"libvirt-1-format"}`,
	}
	f.onCancel = func(f *fakeBlockQEMU) { f.jobs = `{"device":"backup-0","status":"running"}` }
	n, err := RemoveStaleMirrors(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Fatalf("removed %d, want the job and the node", n)
	}
	if f.args["block-job-cancel"]["device"] != "remora-mirror-vda" || f.args["blockdev-del"]["node-name"] != "remora-nbd-vdb" {
		t.Fatalf("commands %v args %v", f.log, f.args)
	}
	if strings.Contains(strings.Join(f.log, ","), "backup") {
		t.Fatal("touched a job that is not ours")
	}
}
