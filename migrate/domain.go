package migrate

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// ErrNoSharedMemory reports a guest whose RAM is not in a shared file, which
// remora needs to copy pages without QEMU's help.
var ErrNoSharedMemory = errors.New("guest RAM is not backed by a shared file")

// SharedMemoryHowTo is the XML an admin adds to a domain to make it protectable.
const SharedMemoryHowTo = `add this inside <domain> (virsh edit DOMAIN), then restart the guest:
  <memoryBacking>
    <source type='file'/>
    <access mode='shared'/>
  </memoryBacking>
and point memory_backing_dir in /etc/libvirt/qemu.conf at tmpfs (e.g. /dev/shm/remora)`

var (
	reMemSourceFile = regexp.MustCompile(`<memoryBacking>(?s:.*?)<source\s+type=['"]file['"]`)
	reMemShared     = regexp.MustCompile(`<memoryBacking>(?s:.*?)<access\s+mode=['"]shared['"]`)
)

// CheckSharedMemoryXML returns an error telling the admin what to add when
// the domain XML lacks shared file memory backing.
func CheckSharedMemoryXML(domain, xml string) error {
	if reMemSourceFile.MatchString(xml) && reMemShared.MatchString(xml) {
		return nil
	}
	return fmt.Errorf("domain %q: %w; %s", domain, ErrNoSharedMemory, strings.ReplaceAll(SharedMemoryHowTo, "DOMAIN", domain))
}

// Guest is the hypervisor view of one running domain that remora captures
// or restores.
type Guest struct {
	Name string
	Conn *Conn
	Mon  *Monitor
	RAM  RAMBackend
}

// OpenGuest checks that a running domain can be protected and finds its RAM.
func OpenGuest(ctx context.Context, c *Conn, name string) (*Guest, error) {
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
		return nil, fmt.Errorf("domain %q is %s: start it first (virsh start %s)", name, state, name)
	}
	g := &Guest{Name: name, Conn: c, Mon: NewMonitor(c, name)}
	if g.RAM, err = MainRAM(g.Mon); err != nil {
		if errors.Is(err, ErrNoSharedMemory) {
			return nil, CheckSharedMemoryXML(name, "")
		}
		return nil, fmt.Errorf("domain %q: find its RAM file: %w", name, err)
	}
	if !g.RAM.Share {
		return nil, CheckSharedMemoryXML(name, "")
	}
	fi, err := os.Stat(g.RAM.Path)
	if err != nil {
		return nil, fmt.Errorf("domain %q: RAM file: %w (the agent must run on the guest's host, as root)", name, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("domain %q: RAM backing %s is not a regular file; QEMU unlinks files it creates in a directory, so remora cannot map it", name, g.RAM.Path)
	}
	return g, nil
}

// PID returns the QEMU process id of the guest: the process that maps its
// RAM file.
func (g *Guest) PID() (int, error) {
	for _, p := range []string{"/run/libvirt/qemu/" + g.Name + ".pid", "/var/run/libvirt/qemu/" + g.Name + ".pid"} {
		if b, err := os.ReadFile(p); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				return pid, nil
			}
		}
	}
	return 0, fmt.Errorf("domain %q: QEMU pid file not found under /run/libvirt/qemu", g.Name)
}
