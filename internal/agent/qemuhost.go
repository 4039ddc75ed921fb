package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/remora-ha/remora/migrate/virt"
)

// checkQEMUHost refuses to start where QEMU could not use what the agent
// hands it: guest RAM files off tmpfs, or sockets and replica images that
// QEMU's user (Debian: libvirt-qemu), or its AppArmor profile, cannot
// reach. It learns that user.
func (a *Agent) checkQEMUHost() error {
	if a.cfg.LibvirtURI != "qemu:///system" {
		return nil // another daemon's settings: not ours to read
	}
	c, err := virt.ReadQEMUConf(a.qemuConfPath)
	if errors.Is(err, fs.ErrNotExist) {
		a.log.Warn("libvirt's qemu.conf is missing; assuming QEMU runs as root", "path", a.qemuConfPath)
		return nil
	}
	if err != nil {
		return err
	}
	if err := c.CheckMemoryBackingDir(); err != nil {
		return fmt.Errorf("%s: %w", a.qemuConfPath, err)
	}
	if err := c.CheckReachable(a.cfg.RuntimeDir, "the agent's sockets"); err != nil {
		return fmt.Errorf("runtime_dir %w", err)
	}
	if err := c.CheckAppArmorReach(a.appArmor, a.cfg.RuntimeDir, "the agent's sockets"); err != nil {
		return fmt.Errorf("runtime_dir %w", err)
	}
	if err := c.CheckReachable(filepath.Join(a.cfg.StateDir, "images"), "the standby's replica disk images"); err != nil {
		return fmt.Errorf("state_dir %w", err)
	}
	a.qemu = c
	return nil
}

// qemuOwnedDir is a directory beneath runtime_dir that QEMU itself creates
// files in (the socket it takes a device state from), owned by its user.
func (a *Agent) qemuOwnedDir(name string) (string, error) {
	d := filepath.Join(a.cfg.RuntimeDir, name)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return "", err
	}
	if err := os.Lchown(d, a.qemu.UID, a.qemu.GID); err != nil {
		return "", fmt.Errorf("give %s to QEMU's user %s: %w", d, a.qemu.User, err)
	}
	return d, nil
}
