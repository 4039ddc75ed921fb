package virt

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/remora-ha/remora/migrate/qemu"
)

const disksXML = `<domain type='qemu'><name>g</name><uuid>7a3a7c30-1b0e-4d7e-9d3e-2f0c6f1e4a11</uuid>
  <memory unit='KiB'>262144</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source dev='/dev/vg/g'/>
      <backingStore type='file'><format type='raw'/><source file='/base.img'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/img/data.img'/>
      <target dev='vdb' bus='virtio'/>
      <alias name='virtio-disk1'/>
    </disk>
    <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <disk type='file' device='disk'><source file='/img/ro.img'/><target dev='vdc' bus='virtio'/><readonly/></disk>
    <interface type='bridge'><source bridge='br0'/><target dev='vnet7'/><alias name='net0'/></interface>
    <interface type='user'><alias name='net1'/></interface>
    <serial type='file'><source path='/var/log/g.serial'/><log file='/var/log/g.log'/><target port='0'/></serial>
  </devices></domain>`

func TestWritableDisks(t *testing.T) {
	devs, err := WritableDisks(disksXML)
	if err != nil || !slices.Equal(devs, []string{"vda", "vdb"}) {
		t.Fatalf("%v %v", devs, err)
	}
	if _, err := WritableDisks("<domain"); err == nil {
		t.Fatal("malformed XML accepted")
	}
}

func TestDiskAlias(t *testing.T) {
	alias, err := DiskAlias(disksXML, "vdb")
	if err != nil || alias != "virtio-disk1" {
		t.Fatal(alias, err)
	}
	if _, err := DiskAlias(disksXML, "vdz"); err == nil || !strings.Contains(err.Error(), "vda, vdb") {
		t.Fatalf("missing disk: %v", err)
	}
	if _, err := DiskAlias(disksXML, "vdc"); err == nil || !strings.Contains(err.Error(), "no alias") {
		t.Fatalf("disk without alias: %v", err)
	}
}

func TestInterfaceTap(t *testing.T) {
	if tap, err := InterfaceTap(disksXML, "hostnet0"); err != nil || tap != "vnet7" {
		t.Fatalf("hostnet0: %q, %v", tap, err)
	}
	for netdev, want := range map[string]string{
		"hostnet1": "has no host tap device",
		"hostnet2": "no interface with alias \"net2\" (interfaces: net0, net1)",
		"mynet":    "not one libvirt named",
	} {
		if _, err := InterfaceTap(disksXML, netdev); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want %q", netdev, err, want)
		}
	}
	if _, err := InterfaceTap("<domain", "hostnet0"); err == nil {
		t.Error("malformed XML accepted")
	}
}

func TestShellXML(t *testing.T) {
	// vdc is read-only, so not replicated: the standby would have to open
	// the primary's /img/ro.img, which it refuses (see shellsafe_test.go).
	primary := strings.Replace(disksXML, "<disk type='file' device='disk'><source file='/img/ro.img'/><target dev='vdc' bus='virtio'/><readonly/></disk>", "", 1)
	o := ShellOptions{Name: "g-b", Images: map[string]string{"vda": "/r/g/vda.img", "vdb": "/r/g/vdb.img"}}
	x, err := ShellXML(primary, o)
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil {
		t.Fatalf("shell XML does not parse: %v\n%s", err, x)
	}
	if d.Name != "g-b" || d.UUID != "" {
		t.Errorf("name %q uuid %q", d.Name, d.UUID)
	}
	src := map[string]string{}
	for _, k := range d.Devices.Disks {
		if k.Source != nil && k.Source.File != nil {
			src[k.Target.Dev] = k.Source.File.File
		}
		if k.Target.Dev == "vda" && (k.Driver.Type != "raw" || k.Driver.Cache != "none" || k.BackingStore != nil) {
			t.Errorf("vda driver %+v backing %+v", k.Driver, k.BackingStore)
		}
		if k.Target.Dev == "vdb" && (k.Driver == nil || k.Driver.Type != "raw") {
			t.Errorf("vdb driver %+v", k.Driver)
		}
	}
	// The CD-ROM stays, empty: its ISO is a path on the primary's host.
	want := map[string]string{"vda": "/r/g/vda.img", "vdb": "/r/g/vdb.img", "sda": ""}
	for dev, p := range want {
		if src[dev] != p {
			t.Errorf("disk %s source %q, want %q", dev, src[dev], p)
		}
	}
	if len(d.Devices.Disks) != 3 || d.Devices.Disks[2].Device != "cdrom" || d.Devices.Disks[2].ReadOnly == nil {
		t.Errorf("disks %+v", d.Devices.Disks)
	}
	for _, p := range []string{"/dev/vg/g", "/base.img", "/img/data.img", "/iso/x.iso", "/var/log/g"} {
		if strings.Contains(x, p) {
			t.Errorf("the primary's %s is in the shell:\n%s", p, x)
		}
	}
	if d.Devices.Interfaces[0].Target != nil {
		t.Errorf("the primary's tap stays in the shell: %+v", d.Devices.Interfaces[0].Target)
	}
	// The serial port stays (its state is in the checkpoints) on a pty of
	// the shell's own; the primary's file and log are not used.
	if s := d.Devices.Serials[0]; s.Source == nil || s.Source.Pty == nil || s.Log != nil {
		t.Errorf("serial %+v log %+v", s.Source, s.Log)
	}
	if c := d.QEMUCommandline; c == nil || len(c.Args) != 2 || c.Args[0].Value != "-incoming" || c.Args[1].Value != "defer" {
		t.Errorf("qemu:commandline %+v", c)
	}
	if !strings.Contains(x, "http://libvirt.org/schemas/domain/qemu/1.0") {
		t.Errorf("no qemu namespace:\n%s", x)
	}

	o.LogDir = "/var/log/remora"
	x, err = ShellXML(primary, o)
	if err != nil {
		t.Fatal(err)
	}
	d = libvirtxml.Domain{}
	if err := d.Unmarshal(x); err != nil {
		t.Fatal(err)
	}
	if l := d.Devices.Serials[0].Log; l == nil || l.File != "/var/log/remora/g-b.serial0.log" {
		t.Errorf("serial log with a LogDir: %+v", l)
	}

	if _, err := ShellXML(primary, ShellOptions{Name: "g-b", Images: map[string]string{"vda": "/a", "vdb": "/b", "vdz": "/x"}}); err == nil || !strings.Contains(err.Error(), "no disk vdz") {
		t.Fatalf("missing disk: %v", err)
	}
	noShared := strings.Replace(primary, "<access mode='shared'/>", "", 1)
	if _, err := ShellXML(noShared, ShellOptions{Name: "g-b"}); !errors.Is(err, qemu.ErrNoSharedMemory) {
		t.Fatalf("private memory: %v", err)
	}
	if _, err := ShellXML("<domain><name>", ShellOptions{Name: "x"}); err == nil {
		t.Fatal("malformed XML accepted")
	}
	for _, bad := range []ShellOptions{{Name: ""}, {Name: "../x"}, {Name: "g-b", BootDirs: []string{"boot"}}, {Name: "g-b", LogDir: "log"}} {
		if _, err := ShellXML(primary, bad); err == nil {
			t.Errorf("options %+v accepted", bad)
		}
	}
}

func TestCheckSharedMemoryXML(t *testing.T) {
	if err := CheckSharedMemoryXML("g", disksXML); err != nil {
		t.Fatal(err)
	}
	err := CheckSharedMemoryXML("g", strings.Replace(disksXML, "type='file'/><access", "type='memfd'/><access", 1))
	if !errors.Is(err, qemu.ErrNoSharedMemory) || !strings.Contains(err.Error(), "virsh edit g") {
		t.Fatalf("memfd: %v", err)
	}
}

// A shell that became the guest is defined without its -incoming defer,
// keeping any other QEMU argument.
func TestWithoutIncoming(t *testing.T) {
	x := `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>web-b</name>` +
		`<qemu:commandline><qemu:arg value='-incoming'/><qemu:arg value='defer'/></qemu:commandline></domain>`
	if !WaitsForIncoming(x) {
		t.Fatal("the shell does not wait for incoming")
	}
	got, err := WithoutIncoming(x)
	if err != nil {
		t.Fatal(err)
	}
	if WaitsForIncoming(got) || strings.Contains(got, "commandline") || !strings.Contains(got, "<name>web-b</name>") {
		t.Fatalf("without incoming:\n%s", got)
	}
	other := strings.Replace(x, "<qemu:arg value='defer'/>", "<qemu:arg value='defer'/><qemu:arg value='-msg'/><qemu:arg value='timestamp=on'/>", 1)
	got, err = WithoutIncoming(other)
	if err != nil {
		t.Fatal(err)
	}
	if WaitsForIncoming(got) || !strings.Contains(got, "timestamp=on") {
		t.Fatalf("other arguments lost:\n%s", got)
	}
}

// Shells carry remora's mark, once, also when built from a shell that
// became the guest (a promoted one, protected again).
func TestShellMark(t *testing.T) {
	plain := `<domain type='qemu'><name>web</name><memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>` +
		`<metadata><lab:x xmlns:lab="https://example.com/lab"/></metadata></domain>`
	if IsShell(plain) {
		t.Fatal("a plain domain taken for a shell")
	}
	shell, err := ShellXML(plain, ShellOptions{Name: "web-b"})
	if err != nil {
		t.Fatal(err)
	}
	if !IsShell(shell) || !strings.Contains(shell, "https://example.com/lab") {
		t.Fatalf("shell without remora's mark, or without the source's metadata:\n%s", shell)
	}
	promoted, err := WithoutIncoming(shell)
	if err != nil {
		t.Fatal(err)
	}
	again, err := ShellXML(promoted, ShellOptions{Name: "web-c"})
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(again, ShellMetadataURI); n != 1 {
		t.Fatalf("%d marks in a shell of a promoted shell:\n%s", n, again)
	}
}
