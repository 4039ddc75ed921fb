package virt_test

import (
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/remora-ha/remora/migrate/virt"
	"github.com/remora-ha/remora/test/labkit"
)

// The guests the project's tests and demo boot are test/labkit's; a
// standby must build shells from them with the default options, and from
// what libvirt makes of them (the migratable XML a primary sends has the
// emulator, security labels, a tap, ...), and from a promoted shell (a
// guest that failed over and is protected again).
func TestShellOfLabGuests(t *testing.T) {
	t.Setenv("REMORA_LAB_DIR", "") // the default lab directory
	const disk = "/var/lib/remora-lab/disks/lab-g.img"
	o := labkit.GuestOptions{Name: "lab-g", IP: labkit.GuestIP(3), DataDisk: disk}
	plain := labkit.DomainXML(o)
	o.Incoming = true
	promoted := labkit.DomainXML(o)

	// What libvirt's migratable XML adds to a running lab guest.
	var d libvirtxml.Domain
	if err := d.Unmarshal(plain); err != nil {
		t.Fatal(err)
	}
	d.UUID = "7a3a7c30-1b0e-4d7e-9d3e-2f0c6f1e4a11"
	d.Resource = &libvirtxml.DomainResource{Partition: "/machine"}
	d.SecLabel = []libvirtxml.DomainSecLabel{{Type: "dynamic", Model: "dac", Relabel: "yes"}}
	d.Devices.Emulator = "/usr/bin/qemu-system-x86_64"
	d.Devices.Interfaces[0].Target = &libvirtxml.DomainInterfaceTarget{Dev: "vnet3"}
	d.Devices.Controllers = append(d.Devices.Controllers, libvirtxml.DomainController{Type: "pci", Model: "pci-root"})
	d.Devices.Inputs = []libvirtxml.DomainInput{{Type: "mouse", Bus: "ps2"}, {Type: "keyboard", Bus: "ps2"}}
	d.Devices.Audios = []libvirtxml.DomainAudio{{ID: 1, None: &libvirtxml.DomainAudioNone{}}}
	migratable, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}

	// The lab's agents add its directory to the boot directories.
	so := virt.ShellOptions{Name: "lab-g-b", Images: map[string]string{"vda": "/state/images/lab-g/vda.img"}, BootDirs: append(virt.DefaultBootDirs(), labkit.LabDir())}
	for name, x := range map[string]string{"labkit.DomainXML": plain, "migratable": migratable, "promoted shell": promoted} {
		t.Run(name, func(t *testing.T) {
			if err := virt.CheckShellSource(x, so); err != nil {
				t.Fatal(err)
			}
			shell, err := virt.ShellXML(x, so)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{disk, "/usr/bin/qemu", "emulator", "vnet3", "console/lab-g.log", "seclabel", "/machine"} {
				if strings.Contains(shell, p) {
					t.Errorf("the shell has the primary's %q:\n%s", p, shell)
				}
			}
			var s libvirtxml.Domain
			if err := s.Unmarshal(shell); err != nil {
				t.Fatal(err)
			}
			if s.Name != "lab-g-b" || s.UUID != "" {
				t.Errorf("name %q uuid %q", s.Name, s.UUID)
			}
			if k := s.Devices.Disks; len(k) != 1 || k[0].Source.File.File != "/state/images/lab-g/vda.img" || k[0].Driver.Cache != "none" {
				t.Errorf("disks %+v", k)
			}
			// The lab's boot files and its cleanup mark stay.
			if s.OS.Kernel != labkit.KernelPath() || s.OS.Initrd != labkit.InitrdPath() || !strings.Contains(shell, labkit.MetadataURI) {
				t.Errorf("os %+v\n%s", s.OS, shell)
			}
			if len(s.Devices.Serials) != 1 || s.Devices.Serials[0].Source.Pty == nil || len(s.Devices.Consoles) != 1 || len(s.Devices.Interfaces) != 1 {
				t.Errorf("devices:\n%s", shell)
			}
			if strings.Count(shell, "-incoming") != 1 {
				t.Errorf("-incoming:\n%s", shell)
			}
		})
	}
}
