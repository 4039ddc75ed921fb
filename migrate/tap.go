package migrate

import (
	"context"
	"encoding/xml"
	"fmt"
	"strings"

	"libvirt.org/go/libvirt"
)

// LiveXML returns a running domain's XML as libvirt holds it, with the
// runtime details (device aliases, tap names) the migratable form drops.
func (c *Conn) LiveXML(ctx context.Context, name string) (string, error) {
	var x string
	err := c.withDomain(ctx, name, func(_ *libvirt.Connect, d *libvirt.Domain) error {
		var err error
		x, err = d.GetXMLDesc(0)
		return err
	})
	return x, err
}

// InterfaceTap returns the host tap device of the network interface whose
// QEMU netdev is netdev (libvirt names it "host" + the device alias).
func InterfaceTap(domainXML, netdev string) (string, error) {
	var d struct {
		Interfaces []struct {
			Type   string `xml:"type,attr"`
			Target struct {
				Dev string `xml:"dev,attr"`
			} `xml:"target"`
			Alias struct {
				Name string `xml:"name,attr"`
			} `xml:"alias"`
		} `xml:"devices>interface"`
	}
	if err := xml.Unmarshal([]byte(domainXML), &d); err != nil {
		return "", fmt.Errorf("parse domain XML: %w", err)
	}
	alias, ok := strings.CutPrefix(netdev, "host")
	if !ok {
		return "", fmt.Errorf("netdev %q is not one libvirt named (host<alias>)", netdev)
	}
	var have []string
	for _, i := range d.Interfaces {
		if i.Alias.Name != alias {
			have = append(have, i.Alias.Name)
			continue
		}
		if i.Target.Dev == "" {
			return "", fmt.Errorf("interface %s (type %s) has no host tap device", alias, i.Type)
		}
		return i.Target.Dev, nil
	}
	return "", fmt.Errorf("no interface with alias %q (interfaces: %s)", alias, strings.Join(have, ", "))
}
