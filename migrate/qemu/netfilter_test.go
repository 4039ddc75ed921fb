package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/digitalocean/go-qemu/qmp"
)

// recMonitor records the commands sent and answers from a table.
type recMonitor struct {
	cmds    []string
	replies map[string]string // command -> raw reply
}

func (m *recMonitor) Connect() error    { return nil }
func (m *recMonitor) Disconnect() error { return nil }
func (m *recMonitor) Events(context.Context) (<-chan qmp.Event, error) {
	return nil, fmt.Errorf("no events")
}
func (m *recMonitor) Run(b []byte) ([]byte, error) {
	m.cmds = append(m.cmds, string(b))
	var c struct {
		Execute   string          `json:"execute"`
		Arguments json.RawMessage `json:"arguments"`
	}
	json.Unmarshal(b, &c)
	key := c.Execute
	if len(c.Arguments) > 0 {
		if r, ok := m.replies[c.Execute+" "+string(c.Arguments)]; ok {
			return []byte(r), nil
		}
	}
	if r, ok := m.replies[key]; ok {
		return []byte(r), nil
	}
	return []byte(`{"return":{}}`), nil
}

func TestNetfilterCommands(t *testing.T) {
	ctx := context.Background()
	m := &recMonitor{}
	if err := AddSocketChardev(ctx, m, "c-out", "/run/x/out.sock"); err != nil {
		t.Fatal(err)
	}
	if err := AddFilterRedirector(ctx, m, FilterRedirector{ID: "rel", Netdev: "hostnet0", Queue: "rx", Indev: "c-in", Position: "head", VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	if err := AddFilterRedirector(ctx, m, FilterRedirector{ID: "cap", Netdev: "hostnet0", Queue: "rx", Outdev: "c-out", Position: "id=rel", Insert: "behind", VnetHdr: true}); err != nil {
		t.Fatal(err)
	}
	DeleteObject(ctx, m, "cap")
	RemoveChardev(ctx, m, "c-out")
	want := []string{
		`{"execute":"chardev-add","arguments":{"backend":{"data":{"addr":{"data":{"path":"/run/x/out.sock"},"type":"unix"},"server":false},"type":"socket"},"id":"c-out"}}`,
		`{"execute":"object-add","arguments":{"id":"rel","indev":"c-in","netdev":"hostnet0","position":"head","qom-type":"filter-redirector","queue":"rx","vnet_hdr_support":true}}`,
		`{"execute":"object-add","arguments":{"id":"cap","insert":"behind","netdev":"hostnet0","outdev":"c-out","position":"id=rel","qom-type":"filter-redirector","queue":"rx","vnet_hdr_support":true}}`,
		`{"execute":"object-del","arguments":{"id":"cap"}}`,
		`{"execute":"chardev-remove","arguments":{"id":"c-out"}}`,
	}
	if len(m.cmds) != len(want) {
		t.Fatalf("%d commands: %q", len(m.cmds), m.cmds)
	}
	for i := range want {
		if m.cmds[i] != want[i] {
			t.Errorf("command %d:\n got %s\nwant %s", i, m.cmds[i], want[i])
		}
	}
}

func TestIsNotFound(t *testing.T) {
	ctx := context.Background()
	m := &recMonitor{replies: map[string]string{
		"object-del":     `{"error":{"class":"GenericError","desc":"object 'nope' not found"}}`,
		"chardev-remove": `{"error":{"class":"GenericError","desc":"Chardev 'nope' not found"}}`,
		"object-add":     `{"error":{"class":"DeviceNotFound","desc":"OUT Device 'nochr' not found"}}`,
		"cont":           `{"error":{"class":"GenericError","desc":"Chardev 'x' is busy"}}`,
	}}
	for _, err := range []error{DeleteObject(ctx, m, "nope"), RemoveChardev(ctx, m, "nope"), AddFilterRedirector(ctx, m, FilterRedirector{})} {
		if !IsNotFound(err) {
			t.Errorf("IsNotFound(%v) = false", err)
		}
	}
	for _, err := range []error{Exec(ctx, m, "cont", nil, nil), fmt.Errorf("domain is not running"), nil} {
		if IsNotFound(err) {
			t.Errorf("IsNotFound(%v) = true", err)
		}
	}
}

func TestListNICs(t *testing.T) {
	ctx := context.Background()
	m := &recMonitor{replies: map[string]string{
		`qom-list {"path":"/machine/peripheral"}`:                                   `{"return":[{"name":"type","type":"string"},{"name":"net0","type":"child<virtio-net-pci>"},{"name":"serial0","type":"child<isa-serial>"}]}`,
		`qom-list {"path":"/machine/peripheral-anon"}`:                              `{"return":[{"name":"type","type":"string"},{"name":"device[0]","type":"child<e1000>"}]}`,
		`qom-list {"path":"/machine/peripheral/net0"}`:                              `{"return":[{"name":"netdev","type":"str"},{"name":"mac","type":"str"}]}`,
		`qom-list {"path":"/machine/peripheral/serial0"}`:                           `{"return":[{"name":"chardev","type":"str"}]}`,
		`qom-list {"path":"/machine/peripheral-anon/device[0]"}`:                    `{"return":[{"name":"netdev","type":"str"}]}`,
		`qom-get {"path":"/machine/peripheral/net0","property":"netdev"}`:           `{"return":"hostnet0"}`,
		`qom-get {"path":"/machine/peripheral-anon/device[0]","property":"netdev"}`: `{"return":"n1"}`,
	}}
	nics, err := ListNICs(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	if len(nics) != 2 || nics[0].Netdev != "hostnet0" || nics[0].Type != "virtio-net-pci" || nics[1].Netdev != "n1" || nics[1].Path != "/machine/peripheral-anon/device[0]" {
		t.Fatalf("%+v", nics)
	}
}
