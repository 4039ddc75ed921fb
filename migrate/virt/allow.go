package virt

import (
	"fmt"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// checkShellSource refuses what a standby must never take from a
// primary's domain XML: it comes over the network, and the shell runs on
// the standby's host. Refused: QEMU pass-through (qemu:commandline,
// capabilities, overrides), host devices and host file systems, disks and
// interfaces backed by anything but a file or an ordinary network. The
// emulator path is dropped: the standby's libvirt picks its own.
func checkShellSource(d *libvirtxml.Domain) error {
	var bad []string
	if d.QEMUCommandline != nil {
		bad = append(bad, "<qemu:commandline> (arbitrary QEMU arguments)")
	}
	if d.QEMUCapabilities != nil || d.QEMUOverride != nil || d.QEMUDeprecation != nil {
		bad = append(bad, "<qemu:capabilities>, <qemu:override> or <qemu:deprecation>")
	}
	if dv := d.Devices; dv != nil {
		dv.Emulator = ""
		for what, n := range map[string]int{
			"<hostdev> (a host device)":       len(dv.Hostdevs),
			"<filesystem> (a host directory)": len(dv.Filesystems),
			"<smartcard>":                     len(dv.Smartcards),
			"<redirdev>":                      len(dv.RedirDevs),
			"<shmem> (host shared memory)":    len(dv.Shmems),
			"<parallel>":                      len(dv.Parallels),
		} {
			if n > 0 {
				bad = append(bad, what)
			}
		}
		for _, nic := range dv.Interfaces {
			if s := nic.Source; s != nil && (s.Direct != nil || s.Hostdev != nil || s.VHostUser != nil || s.VDPA != nil) {
				bad = append(bad, "an interface of type direct, hostdev, vhostuser or vdpa (host network hardware)")
			}
		}
	}
	return refuse(d, bad)
}

// checkShellDisks runs once the replicated disks point at the standby's
// images: any other disk must not open a host device or a network source
// on the standby.
func checkShellDisks(d *libvirtxml.Domain) error {
	var bad []string
	if d.Devices != nil {
		for _, disk := range d.Devices.Disks {
			if s := disk.Source; s != nil && (s.Block != nil || s.Dir != nil || s.Network != nil || s.Volume != nil || s.NVME != nil || s.VHostUser != nil) {
				dev := ""
				if disk.Target != nil {
					dev = disk.Target.Dev
				}
				bad = append(bad, fmt.Sprintf("disk %s, not replicated, backed by a host block device, directory, volume or network source", dev))
			}
		}
	}
	return refuse(d, bad)
}

func refuse(d *libvirtxml.Domain, bad []string) error {
	if len(bad) > 0 {
		return fmt.Errorf("the primary's domain XML for %q has %s: a standby builds shells only from emulated devices and file disks; remove them from the guest, or protect it without remora", d.Name, strings.Join(bad, ", "))
	}
	return nil
}
