package virt

import (
	"strings"
	"testing"
)

// Each element a standby must not take from a primary is refused by name;
// the control shows the same XML without it makes a shell.
func TestShellRefusesHostAccess(t *testing.T) {
	base := `<domain type='qemu'%s><name>g</name><memory unit='KiB'>131072</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/opt/evil/qemu</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/img/g.img'/><target dev='vda' bus='virtio'/></disk>
    %s
  </devices>%s</domain>`
	qemuNS := " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"
	opts := ShellOptions{Name: "g-b", Images: map[string]string{"vda": "/r/g/vda.img"}}
	x, err := ShellXML(strings.Replace(strings.Replace(strings.Replace(base, "%s", "", 1), "%s", "", 1), "%s", "", 1), opts)
	if err != nil {
		t.Fatalf("control: a plain guest: %v", err)
	}
	if strings.Contains(x, "/opt/evil") || strings.Contains(x, "/img/g.img") {
		t.Fatalf("the shell keeps the primary's paths:\n%s", x)
	}
	for _, c := range []struct {
		name, ns, devices, tail, want string
	}{
		{"qemu:commandline", qemuNS, "", "<qemu:commandline><qemu:arg value='-snapshot'/></qemu:commandline>", "qemu:commandline"},
		{"qemu:capabilities", qemuNS, "", "<qemu:capabilities><qemu:del capability='sandbox'/></qemu:capabilities>", "qemu:capabilities"},
		{"hostdev", "", "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/></source></hostdev>", "", "<hostdev>"},
		{"filesystem", "", "<filesystem type='mount'><source dir='/etc'/><target dir='etc'/></filesystem>", "", "<filesystem>"},
		{"block disk", "", "<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdz' bus='virtio'/><readonly/></disk>", "", "disk vdz"},
		{"network disk", "", "<disk type='network' device='disk'><source protocol='nbd' name='x'><host name='10.0.0.9' port='10809'/></source><target dev='vdy' bus='virtio'/><readonly/></disk>", "", "disk vdy"},
		{"direct interface", "", "<interface type='direct'><source dev='eth0' mode='bridge'/></interface>", "", "type direct"},
		{"shmem", "", "<shmem name='x'><model type='ivshmem-plain'/></shmem>", "", "<shmem>"},
	} {
		t.Run(c.name, func(t *testing.T) {
			x := strings.Replace(strings.Replace(strings.Replace(base, "%s", c.ns, 1), "%s", c.devices, 1), "%s", c.tail, 1)
			_, err := ShellXML(x, opts)
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "from the guest or protect the guest without remora") {
				t.Fatalf("%s: %v", c.name, err)
			}
		})
	}
}
