package virt

import (
	"context"
	"errors"
	"fmt"
	"os"

	"libvirt.org/go/libvirt"

	"github.com/remora-ha/remora/migrate/qemu"
)

// OpenGuest checks that a running domain can be protected and finds its
// RAM file.
func (c *Conn) OpenGuest(ctx context.Context, name string) (*qemu.Guest, error) {
	x, err := c.DomainXML(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := CheckSharedMemoryXML(name, x); err != nil {
		return nil, err
	}
	state, err := c.DomainState(ctx, name)
	if err != nil {
		return nil, err
	}
	if state != "running" && state != "paused" {
		return nil, fmt.Errorf("guest %q is %s: %w", name, state, ErrNotRunning)
	}
	g := &qemu.Guest{Name: name, Mon: NewMonitor(c, name)}
	if g.RAM, err = qemu.MainRAM(ctx, g.Mon); err != nil {
		if errors.Is(err, qemu.ErrNoSharedMemory) {
			return nil, noSharedMemory(name)
		}
		return nil, fmt.Errorf("guest %q: find its RAM file: %w", name, err)
	}
	if !g.RAM.Share {
		return nil, noSharedMemory(name)
	}
	fi, err := os.Stat(g.RAM.Path)
	if err != nil {
		return nil, fmt.Errorf("guest %q: RAM file: %w (the agent must run on the guest's host, as root)", name, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("guest %q: RAM backing %s is not a regular file; QEMU unlinks files it creates in a directory, so remora cannot map it", name, g.RAM.Path)
	}
	if err := CheckRAMFilesystem(g.RAM.Path); err != nil {
		return nil, fmt.Errorf("guest %q: RAM file %s is %w; %s, then restart the guest", name, g.RAM.Path, err, MemoryBackingHowTo)
	}
	return g, nil
}

// ErrNotRunning reports a domain that is defined but not running.
var ErrNotRunning = errors.New("the domain is not running")

// Guest returns a QEMU handle on a domain without checking it can be
// protected (a standby shell, a promoted guest).
func (c *Conn) Guest(name string) *qemu.Guest {
	return &qemu.Guest{Name: name, Mon: NewMonitor(c, name)}
}

// FindDisk finds guest g's disk with libvirt target dev (e.g. "vda").
func (c *Conn) FindDisk(ctx context.Context, g *qemu.Guest, dev string) (qemu.DiskNode, error) {
	// The live XML: the migratable form has no aliases.
	x, err := c.LiveXML(ctx, g.Name)
	if err != nil {
		return qemu.DiskNode{}, err
	}
	alias, err := DiskAlias(x, dev)
	if err != nil {
		return qemu.DiskNode{}, fmt.Errorf("guest %q: %w", g.Name, err)
	}
	d, err := qemu.FindDiskNode(ctx, g.Mon, alias)
	if err != nil {
		return qemu.DiskNode{}, fmt.Errorf("guest %q disk %s: %w", g.Name, dev, err)
	}
	d.Target = dev
	return d, nil
}

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
