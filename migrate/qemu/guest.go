package qemu

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/digitalocean/go-qemu/qmp"
)

// ErrNoSharedMemory reports a guest whose RAM is not in a shared file, which
// remora needs to copy pages without QEMU's help.
var ErrNoSharedMemory = errors.New("guest RAM is not backed by a shared file")

// Guest is one running QEMU guest that remora captures or restores.
type Guest struct {
	Name string
	Mon  qmp.Monitor
	RAM  RAMBackend
	// Process is QEMU's pid when the caller started QEMU itself; zero
	// for a libvirt domain, whose pid file tells.
	Process int
}

// PID returns the QEMU process id of the guest (the process that maps its
// RAM file), from the pid file libvirt keeps.
func (g *Guest) PID() (int, error) {
	if g.Process != 0 {
		return g.Process, nil
	}
	for _, p := range []string{"/run/libvirt/qemu/" + g.Name + ".pid", "/var/run/libvirt/qemu/" + g.Name + ".pid"} {
		if b, err := os.ReadFile(p); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				return pid, nil
			}
		}
	}
	return 0, fmt.Errorf("guest %q: QEMU pid file not found under /run/libvirt/qemu", g.Name)
}
