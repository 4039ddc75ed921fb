package qemu

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/digitalocean/go-qemu/qmp"
)

// QMP helpers for QEMU's network filters and socket character devices, as
// used by network output commit (checkpoint/outcommit). Checked against
// QEMU 7.2 (Debian 12).
//
// Direction names follow QEMU's filter semantics: a filter hangs on a
// netdev (the tap, "hostnet0" under libvirt), and "queue":"rx" is the
// netdev's receive queue, i.e. the frames the guest's NIC sends to the tap:
// the guest's output. "tx" is what the tap sends towards the guest.

// AddSocketChardev adds a socket chardev with the given id that connects
// (client mode) to the unix socket at path. QEMU connects synchronously, so
// something must already listen there; a listener's backlog is enough.
//
//	{"execute":"chardev-add","arguments":{"id":ID,"backend":{"type":"socket",
//	  "data":{"addr":{"type":"unix","data":{"path":PATH}},"server":false}}}}
func AddSocketChardev(ctx context.Context, m qmp.Monitor, id, path string) error {
	return Exec(ctx, m, "chardev-add", map[string]any{
		"id": id,
		"backend": map[string]any{
			"type": "socket",
			"data": map[string]any{
				"addr":   map[string]any{"type": "unix", "data": map[string]any{"path": path}},
				"server": false,
			},
		},
	}, nil)
}

// RemoveChardev removes a chardev (QEMU refuses while a frontend, such as a
// filter, still uses it).
func RemoveChardev(ctx context.Context, m qmp.Monitor, id string) error {
	return Exec(ctx, m, "chardev-remove", map[string]any{"id": id}, nil)
}

// FilterRedirector is a QEMU filter-redirector object.
type FilterRedirector struct {
	ID     string
	Netdev string // the netdev (backend) id, e.g. hostnet0
	Queue  string // "rx" (frames the guest sends), "tx" (frames to the guest) or "all"
	Indev  string // chardev whose frames the filter passes on (optional)
	Outdev string // chardev the filter sends the frames it takes to (optional)
	// Position is "head", "tail" (QEMU's default) or "id=<filter id>";
	// Insert is "before" or "behind" (the default) that filter. Frames of
	// queue rx pass the netdev's filters from the tail to the head, frames
	// of queue tx from the head to the tail.
	Position string
	Insert   string
	// VnetHdr makes every frame on the chardevs carry, after its be32
	// length, a be32 virtio-net header length (vnet_hdr_support).
	VnetHdr bool
}

// AddFilterRedirector adds a filter-redirector with object-add:
//
//	{"execute":"object-add","arguments":{"qom-type":"filter-redirector","id":ID,
//	  "netdev":NETDEV,"queue":QUEUE,"outdev"|"indev":CHARDEV,
//	  "position":POS,"insert":INS,"vnet_hdr_support":BOOL}}
func AddFilterRedirector(ctx context.Context, m qmp.Monitor, f FilterRedirector) error {
	args := map[string]any{
		"qom-type":         "filter-redirector",
		"id":               f.ID,
		"netdev":           f.Netdev,
		"vnet_hdr_support": f.VnetHdr,
	}
	for k, v := range map[string]string{"queue": f.Queue, "indev": f.Indev, "outdev": f.Outdev,
		"position": f.Position, "insert": f.Insert} {
		if v != "" {
			args[k] = v
		}
	}
	return Exec(ctx, m, "object-add", args, nil)
}

// DeleteObject removes a QOM object added with object-add.
func DeleteObject(ctx context.Context, m qmp.Monitor, id string) error {
	return Exec(ctx, m, "object-del", map[string]any{"id": id}, nil)
}

// IsNotFound reports whether err is QEMU saying that the object, chardev or
// device named in the command does not exist (object-del and
// chardev-remove of an unknown id).
func IsNotFound(err error) bool {
	var qe *QMPError
	if !errors.As(err, &qe) {
		return false
	}
	return qe.Class == "DeviceNotFound" || strings.HasSuffix(qe.Desc, " not found")
}

// NIC is a network device of the guest and the netdev it is connected to.
type NIC struct {
	Path   string // QOM path, e.g. /machine/peripheral/net0
	Type   string // e.g. virtio-net-pci
	Netdev string // e.g. hostnet0
}

func (n NIC) String() string { return fmt.Sprintf("%s (%s) on netdev %q", n.Path, n.Type, n.Netdev) }

// ListNICs lists the guest's devices that have a netdev property (found
// through QOM under /machine/peripheral and /machine/peripheral-anon).
func ListNICs(ctx context.Context, m qmp.Monitor) ([]NIC, error) {
	type prop struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	var nics []NIC
	for _, root := range []string{"/machine/peripheral", "/machine/peripheral-anon"} {
		var kids []prop
		if err := Exec(ctx, m, "qom-list", map[string]string{"path": root}, &kids); err != nil {
			return nil, err
		}
		for _, k := range kids {
			if !strings.HasPrefix(k.Type, "child<") {
				continue
			}
			p := root + "/" + k.Name
			var props []prop
			if err := Exec(ctx, m, "qom-list", map[string]string{"path": p}, &props); err != nil {
				continue // gone meanwhile
			}
			has := false
			for _, q := range props {
				if q.Name == "netdev" {
					has = true
					break
				}
			}
			if !has {
				continue
			}
			var netdev string
			if err := Exec(ctx, m, "qom-get", map[string]string{"path": p, "property": "netdev"}, &netdev); err != nil {
				continue
			}
			nics = append(nics, NIC{Path: p, Type: strings.TrimSuffix(strings.TrimPrefix(k.Type, "child<"), ">"), Netdev: netdev})
		}
	}
	return nics, nil
}
