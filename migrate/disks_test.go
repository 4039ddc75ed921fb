package migrate

import (
	"slices"
	"strings"
	"testing"
)

const disksXML = `<domain type='qemu'><name>g</name><devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source dev='/dev/vg/g'/>
      <backingStore type='file'><format type='raw'/><source file='/base.img'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/img/data.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <disk type='file' device='disk'><source file='/img/ro.img'/><target dev='vdc' bus='virtio'/><readonly/></disk>
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

func TestShellDisks(t *testing.T) {
	x, err := ShellDisks(disksXML, map[string]string{"vda": "/r/g/vda.img", "vdb": "/r/g/vdb.img"})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"<disk type='file' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n      <source file='/r/g/vda.img'/>\n      <target dev='vda'",
		"<driver name='qemu' type='raw'/>\n      <source file='/r/g/vdb.img'/>",
		"<source file='/iso/x.iso'/>",
		"<source file='/img/ro.img'/>",
	} {
		if !strings.Contains(x, want) {
			t.Errorf("shell XML lacks %q:\n%s", want, x)
		}
	}
	if strings.Contains(x, "backingStore") || strings.Contains(x, "/dev/vg/g") || strings.Contains(x, "/img/data.img") {
		t.Errorf("primary's disk paths left in the shell:\n%s", x)
	}
	if _, err := ShellDisks(disksXML, map[string]string{"vdz": "/x"}); err == nil || !strings.Contains(err.Error(), "no disk vdz") {
		t.Fatalf("missing disk: %v", err)
	}
}
