package virt

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"
)

// hostileBase is a plain protectable guest; the refusal cases put one
// hostile element into it at TOP (inside <domain>), OS (inside <os>),
// DEVICES (inside <devices>) or TAIL (before </domain>).
const hostileBase = `<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>g</name><memory unit='KiB'>131072</memory>TOP
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='pc'>hvm</type>OS</os>
  <devices><emulator>/opt/evil/qemu</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/g.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>
    DEVICES
  </devices>TAIL</domain>`

var hostileOpts = ShellOptions{Name: "g-b", Images: map[string]string{"vda": "/r/g/vda.img"}}

func hostile(at, what string) string {
	x := hostileBase
	for _, p := range []string{"TOP", "OS", "DEVICES", "TAIL"} {
		if p == at {
			x = strings.Replace(x, p, what, 1)
		} else {
			x = strings.Replace(x, p, "", 1)
		}
	}
	return x
}

type refusalCase struct {
	name     string
	at, what string // where and what is added to hostileBase
	want     string // the refusal names this
	// marker is in the shell's XML if the element got into the shell; a
	// working check keeps it out by refusing, the disabled one lets it in.
	marker string
}

var refusalCases = []refusalCase{
	// QEMU namespace
	{"qemu:commandline", "TAIL", "<qemu:commandline><qemu:arg value='-snapshot'/></qemu:commandline>", "<qemu:commandline>", "-snapshot"},
	{"qemu:commandline env", "TAIL", "<qemu:commandline><qemu:env name='LD_PRELOAD' value='/tmp/x.so'/></qemu:commandline>", "<qemu:commandline>", "LD_PRELOAD"},
	{"qemu:commandline other incoming", "TAIL", "<qemu:commandline><qemu:arg value='-incoming'/><qemu:arg value='exec:sh -c evil'/></qemu:commandline>", "<qemu:commandline>", "exec:sh"},
	{"qemu:capabilities", "TAIL", "<qemu:capabilities><qemu:del capability='sandbox'/></qemu:capabilities>", "<qemu:capabilities>", "sandbox"},
	{"qemu:override", "TAIL", "<qemu:override><qemu:device alias='net0'><qemu:frontend><qemu:property name='romfile' type='string' value='/etc/shadow'/></qemu:frontend></qemu:device></qemu:override>", "<qemu:override>", "/etc/shadow"},
	{"qemu:deprecation", "TAIL", "<qemu:deprecation behavior='crash'/>", "<qemu:deprecation>", "deprecation"},
	// host devices and host files
	{"hostdev pci", "DEVICES", "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/></source></hostdev>", "<hostdev> (a host device)", "<hostdev"},
	{"hostdev usb", "DEVICES", "<hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0x5678'/></source></hostdev>", "<hostdev> (a host device)", "<hostdev"},
	{"filesystem", "DEVICES", "<filesystem type='mount'><source dir='/etc'/><target dir='etc'/></filesystem>", "<filesystem>", "<filesystem"},
	{"smartcard", "DEVICES", "<smartcard mode='passthrough' type='tcp'><source mode='connect' host='10.0.0.9' service='2001'/></smartcard>", "<smartcard>", "<smartcard"},
	{"redirdev", "DEVICES", "<redirdev bus='usb' type='tcp'><source mode='connect' host='10.0.0.9' service='4000'/></redirdev>", "<redirdev>", "<redirdev"},
	{"shmem", "DEVICES", "<shmem name='x'><model type='ivshmem-plain'/></shmem>", "<shmem>", "<shmem"},
	{"lease", "DEVICES", "<lease><lockspace>s</lockspace><key>k</key><target path='/var/lib/libvirt/sanlock/x'/></lease>", "<lease>", "sanlock"},
	{"tpm", "DEVICES", "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>", "<tpm>", "/dev/tpm0"},
	{"nvdimm", "DEVICES", "<memory model='nvdimm'><source><path>/etc/shadow</path></source><target><size unit='KiB'>524288</size><node>0</node></target></memory>", "<memory> device", "/etc/shadow"},
	// disks
	{"block disk", "DEVICES", "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sda'/><target dev='vdz' bus='virtio'/></disk>", "disk vdz (<disk type='block'", "/dev/sda"},
	{"read-only file disk", "DEVICES", "<disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdy' bus='virtio'/><readonly/></disk>", "disk vdy", "/etc/shadow"},
	{"shareable file disk", "DEVICES", "<disk type='file' device='disk'><source file='/srv/other-vm.img'/><target dev='vdx' bus='virtio'/><shareable/></disk>", "disk vdx", "/srv/other-vm.img"},
	{"dir disk", "DEVICES", "<disk type='dir' device='disk'><source dir='/root'/><target dev='vdw' bus='virtio'/></disk>", "disk vdw (<disk type='dir'", "/root"},
	{"network disk", "DEVICES", "<disk type='network' device='disk'><source protocol='nbd' name='x'><host name='10.0.0.9' port='10809'/></source><target dev='vdv' bus='virtio'/><readonly/></disk>", "disk vdv (<disk type='network'", "10.0.0.9"},
	{"nvme disk", "DEVICES", "<disk type='nvme' device='disk'><source type='pci' managed='yes' namespace='1'><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source><target dev='vdu' bus='virtio'/></disk>", "disk vdu (<disk type='nvme'", "nvme"},
	{"lun", "DEVICES", "<disk type='block' device='lun'><source dev='/dev/sdb'/><target dev='sdb' bus='scsi'/></disk>", "disk sdb", "/dev/sdb"},
	// interfaces
	{"direct interface", "DEVICES", "<interface type='direct'><source dev='eth0' mode='bridge'/></interface>", "<interface> of type direct", "direct"},
	{"hostdev interface", "DEVICES", "<interface type='hostdev' managed='yes'><source><address type='pci' domain='0x0000' bus='0x03' slot='0x10' function='0x1'/></source></interface>", "<interface> of type hostdev", "hostdev"},
	{"vhostuser interface", "DEVICES", "<interface type='vhostuser'><source type='unix' path='/run/openvswitch/vhu0' mode='client'/><model type='virtio'/></interface>", "<interface> of type vhostuser", "/run/openvswitch/vhu0"},
	{"udp interface", "DEVICES", "<interface type='udp'><source address='10.9.9.9' port='5555'><local address='0.0.0.0' port='5556'/></source></interface>", "<interface> of type udp", "10.9.9.9"},
	{"ethernet script", "DEVICES", "<interface type='ethernet'><script path='/bin/evil'/></interface>", "<script>", "/bin/evil"},
	{"ethernet host route", "DEVICES", "<interface type='ethernet'><ip address='192.0.2.1' prefix='24'/><route family='ipv4' address='0.0.0.0' prefix='0' gateway='192.0.2.254'/></interface>", "<route>", "192.0.2.254"},
	{"passt port forward", "DEVICES", "<interface type='user'><backend type='passt'/><portForward proto='tcp'><range start='22'/></portForward></interface>", "<portForward>", "portForward"},
	{"option ROM", "DEVICES", "<interface type='network'><source network='default'/><rom file='/etc/shadow'/></interface>", "<interface><rom>", "/etc/shadow"},
	// other devices
	{"guestfwd channel", "DEVICES", "<channel type='tcp'><source mode='connect' host='127.0.0.1' service='22'/><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>", "guestfwd", "guestfwd"},
	{"evdev input", "DEVICES", "<input type='evdev'><source dev='/dev/input/event0'/></input>", "<input type='evdev'>", "/dev/input/event0"},
	{"egl-headless", "DEVICES", "<graphics type='egl-headless'><gl rendernode='/dev/dri/renderD128'/></graphics>", "OpenGL", "renderD128"},
	{"spice gl", "DEVICES", "<graphics type='spice'><gl enable='yes' rendernode='/dev/dri/renderD129'/></graphics>", "OpenGL", "renderD129"},
	{"vhost-user gpu", "DEVICES", "<video><model type='virtio'/><driver name='vhostuser'/></video>", "vhostuser", "vhostuser"},
	{"3d video", "DEVICES", "<video><model type='virtio'><acceleration accel3d='yes'/></model></video>", "accel3d", "accel3d"},
	{"egd rng", "DEVICES", "<rng model='virtio'><backend model='egd' type='unix'><source mode='connect' path='/run/egd.sock'/></backend></rng>", "egd", "/run/egd.sock"},
	{"rng from a host device", "DEVICES", "<rng model='virtio'><backend model='random'>/dev/mem</backend></rng>", "/dev/mem", "/dev/mem"},
	// boot files, firmware
	{"kernel outside the boot dirs", "OS", "<kernel>/etc/shadow</kernel>", "<kernel> \"/etc/shadow\"", "/etc/shadow"},
	{"initrd outside the boot dirs", "OS", "<initrd>/root/.ssh/id_ed25519</initrd>", "<initrd>", "id_ed25519"},
	{"kernel escaping a boot dir", "OS", "<kernel>/usr/share/qemu/../../../etc/shadow</kernel>", "<kernel>", "/etc/shadow"},
	{"dtb", "OS", "<dtb>/etc/machine-id</dtb>", "<dtb>", "/etc/machine-id"},
	{"loader outside", "OS", "<loader readonly='yes' type='pflash'>/srv/evil.fd</loader>", "<loader> (firmware)", "/srv/evil.fd"},
	{"writable loader", "OS", "<loader readonly='no' type='pflash'>/usr/share/OVMF/OVMF.fd</loader>", "not read-only", "readonly=\"no\""},
	{"nvram template outside", "OS", "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram template='/etc/passwd'/>", "<nvram template>", "/etc/passwd"},
	{"acpi table", "OS", "<acpi><table type='slic'>/sys/firmware/acpi/tables/SLIC</table></acpi>", "<acpi><table>", "/sys/firmware"},
	{"fw_cfg host file", "TOP", "<sysinfo type='fwcfg'><entry name='opt/com.example/key' file='/etc/ssh/ssh_host_ed25519_key'/></sysinfo>", "<sysinfo type='fwcfg'>", "ssh_host_ed25519_key"},
	// the domain itself
	{"bootloader", "TOP", "<bootloader>/usr/bin/pygrub</bootloader>", "<bootloader>", "pygrub"},
	{"launch security", "TAIL", "<launchSecurity type='sev'><cbitpos>47</cbitpos><reducedPhysBits>1</reducedPhysBits><policy>0x0003</policy></launchSecurity>", "<launchSecurity>", "launchSecurity"},
	{"metadata declaration", "TOP", "<metadata><!ENTITY x SYSTEM 'file:///etc/shadow'><a/></metadata>", "<metadata>", "ENTITY"},
}

// refusalProblem says what is wrong with the outcome of one refusal case,
// or "" if ShellXML refused it by name and built no shell with it.
func refusalProblem(c refusalCase, shell string, err error) string {
	switch {
	case err == nil && strings.Contains(shell, c.marker):
		return "accepted, and the shell has " + c.marker
	case err == nil:
		return "accepted"
	case !errors.Is(err, ErrUnsafeDomain):
		return "refused, but not as ErrUnsafeDomain: " + err.Error()
	case !strings.Contains(err.Error(), c.want):
		return "the refusal does not name " + c.want + ": " + err.Error()
	case !strings.Contains(err.Error(), `guest "g": the primary's domain XML has `) ||
		!strings.HasSuffix(err.Error(), "; remove it from the guest or protect the guest without remora"):
		return "the refusal does not say what to do: " + err.Error()
	}
	return ""
}

func TestShellRefusals(t *testing.T) {
	if x, err := ShellXML(hostile("", ""), hostileOpts); err != nil {
		t.Fatalf("control: the base guest: %v", err)
	} else if strings.Contains(x, "/opt/evil") || strings.Contains(x, "/img/g.qcow2") {
		t.Fatalf("control: the shell has the primary's paths:\n%s", x)
	}
	for _, c := range refusalCases {
		t.Run(c.name, func(t *testing.T) {
			x := hostile(c.at, c.what)
			shell, err := ShellXML(x, hostileOpts)
			if p := refusalProblem(c, shell, err); p != "" {
				t.Fatal(p)
			}
			if err2 := CheckShellSource(x, hostileOpts); err2 == nil || err2.Error() != err.Error() {
				t.Fatalf("CheckShellSource: %v", err2)
			}
			t.Log(err)
		})
	}
}

// TestShellRefusalsNegativeControl disables the check: every refusal case
// then yields a shell that has its hostile element, which
// TestShellRefusals would report. So the refusals come from the check, and
// the markers detect an element that got through.
func TestShellRefusalsNegativeControl(t *testing.T) {
	noCheck := func(*libvirtxml.Domain, ShellOptions) error { return nil }
	for _, c := range refusalCases {
		shell, err := shellXML(hostile(c.at, c.what), hostileOpts, noCheck)
		if err != nil {
			t.Errorf("%s: without the check: %v", c.name, err)
			continue
		}
		if !strings.Contains(shell, c.marker) {
			t.Errorf("%s: without the check the shell lacks %q, so the case shows nothing:\n%s", c.name, c.marker, shell)
		}
		if refusalProblem(c, shell, err) == "" {
			t.Errorf("%s: passes without the check", c.name)
		}
	}
}

func TestShellRefusesSeveral(t *testing.T) {
	x := hostile("DEVICES", "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0' slot='1' function='0'/></source></hostdev>"+
		"<filesystem type='mount'><source dir='/etc'/><target dir='etc'/></filesystem>"+
		"<interface type='direct'><source dev='eth0' mode='vepa'/></interface>")
	err := CheckShellSource(x, hostileOpts)
	if err == nil {
		t.Fatal("accepted")
	}
	msg := err.Error()
	for _, want := range []string{"has <filesystem> (a host directory passed through), and <hostdev> (a host device): a standby builds shells only from emulated devices",
		"; it also has an <interface> of type direct", "; remove them from the guest"} {
		if !strings.Contains(msg, want) {
			t.Errorf("%q\nlacks %q", msg, want)
		}
	}
}

// A guest that failed over runs in a shell remora made, with -incoming
// defer on its command line; protecting it again must work, and its own
// shell gets one -incoming defer.
func TestShellOfAShell(t *testing.T) {
	for _, args := range []string{
		"<qemu:arg value='-incoming'/><qemu:arg value='defer'/>",
		"<qemu:arg value='-incoming'/><qemu:arg value='defer'/><qemu:arg value='-incoming'/><qemu:arg value='defer'/>",
	} {
		x, err := ShellXML(hostile("TAIL", "<qemu:commandline>"+args+"</qemu:commandline>"), hostileOpts)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Count(x, "-incoming") != 1 || strings.Count(x, "defer") != 1 {
			t.Errorf("%s:\n%s", args, x)
		}
	}
}

func TestShellBootDirs(t *testing.T) {
	kernel := func(p string) string { return hostile("OS", "<kernel>"+p+"</kernel><initrd>/opt/k/initrd</initrd>") }
	o := hostileOpts
	o.BootDirs = []string{"/opt/k"}
	if x, err := ShellXML(kernel("/opt/k/vmlinuz"), o); err != nil || !strings.Contains(x, "/opt/k/vmlinuz") {
		t.Fatalf("a kernel in a boot dir: %v\n%s", err, x)
	}
	for _, p := range []string{"/opt/kx/vmlinuz", "/opt/k/../k/vmlinuz", "opt/k/vmlinuz", "/opt/k"} {
		if err := CheckShellSource(kernel(p), o); err == nil || !strings.Contains(err.Error(), "only from /opt/k") {
			t.Errorf("kernel %s: %v", p, err)
		}
	}
	// The default directories take distribution firmware.
	x := hostile("OS", "<loader readonly='yes' secure='no' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"+
		"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/g_VARS.fd</nvram>")
	shell, err := ShellXML(x, hostileOpts)
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(shell); err != nil {
		t.Fatal(err)
	}
	// The primary's NVRAM file is not the shell's: libvirt makes one from
	// the template.
	if l, n := d.OS.Loader, d.OS.NVRam; l == nil || l.Path != "/usr/share/OVMF/OVMF_CODE_4M.fd" || n == nil || n.NVRam != "" || n.Template != "/usr/share/OVMF/OVMF_VARS_4M.fd" {
		t.Errorf("loader %+v nvram %+v", l, n)
	}
}

// Harmless but host-specific elements are dropped or replaced, not refused.
func TestShellDropsHostSpecific(t *testing.T) {
	x := strings.NewReplacer(
		"TOP", `<blkiotune><device><path>/dev/sda</path><weight>500</weight></device></blkiotune>
  <vcpu placement='static' cpuset='2-3'>2</vcpu>
  <cputune><vcpupin vcpu='0' cpuset='2'/></cputune>
  <numatune><memory mode='strict' nodeset='1'/></numatune>
  <resource><partition>/machine/evil</partition></resource>`,
		"OS", "",
		"DEVICES", `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/top.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/img/base.qcow2'/></backingStore>
      <mirror type='file' job='copy'><source file='/img/mirror.img'/></mirror>
      <target dev='vdb' bus='virtio'/><serial>S1</serial></disk>
    <disk type='file' device='cdrom'><source file='/iso/secret.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='bridge'><source bridge='br1'/><target dev='vnet9'/><backend tap='/dev/sda' vhost='/dev/mem'/><model type='virtio'/></interface>
    <interface type='user'><backend type='passt' logFile='/etc/cron.d/passt'/><source dev='eth9'/></interface>
    <serial type='file'><source path='/etc/cron.d/evil'/><log file='/etc/profile.d/evil.sh'/><target port='0'/></serial>
    <serial type='unix'><source mode='connect' path='/run/some.sock'/><target port='1'/></serial>
    <console type='tcp'><source mode='bind' host='0.0.0.0' service='2222'/><protocol type='telnet'/><target type='virtio' port='0'/></console>
    <parallel type='dev'><source path='/dev/parport0'/><target port='0'/></parallel>
    <channel type='unix'><source mode='connect' path='/run/host-agent.sock'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='file'><source path='/etc/passwd'/><target type='virtio' name='org.example.0'/></channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <graphics type='vnc' socket='/run/vnc-evil.sock'/>
    <graphics type='spice' port='5930' tlsPort='5931' autoport='no' listen='10.1.2.3'><listen type='address' address='10.1.2.3'/><listen type='socket' socket='/run/spice-evil.sock'/></graphics>
    <graphics type='sdl' display=':0' xauth='/root/.Xauthority'/>
    <sound model='ich9'><audio id='1'/></sound>
    <audio id='1' type='file' path='/etc/motd'/>
    <video><model type='virtio'><acceleration accel3d='no' rendernode='/dev/dri/renderD128'/></model></video>
    <vsock model='virtio'><cid auto='no' address='42'/></vsock>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>`,
		"TAIL", `<seclabel type='none' model='selinux'/><seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>`,
	).Replace(hostileBase)
	o := hostileOpts
	o.Images = map[string]string{"vda": "/r/g/vda.img", "vdb": "/r/g/vdb.img"}
	shell, err := ShellXML(x, o)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/opt/evil", "/img/", "/iso/", "/dev/sda", "/dev/mem", "/dev/parport0", "/dev/dri", "/etc/", "/run/", "/root/",
		"vnet9", "eth9", "10.1.2.3", "5930", "5931", "cpuset", "vcpupin", "numatune", "blkiotune", "/machine", "seclabel", "+0:+0", "emulator", "sdl", "2222", "telnet", "qcow2", "mirror", "backingStore"} {
		if strings.Contains(shell, p) {
			t.Errorf("the shell has %q:\n%s", p, shell)
		}
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(shell); err != nil {
		t.Fatal(err)
	}
	dv := d.Devices
	// The guest's devices stay, so its checkpoints load into the shell.
	if len(dv.Disks) != 3 || len(dv.Interfaces) != 3 || len(dv.Serials) != 2 || len(dv.Consoles) != 1 || len(dv.Parallels) != 1 ||
		len(dv.Channels) != 3 || len(dv.Sounds) != 1 || len(dv.Audios) != 1 || len(dv.Videos) != 1 || dv.VSock == nil || len(dv.RNGs) != 1 {
		t.Fatalf("devices lost:\n%s", shell)
	}
	if k := dv.Disks[1]; k.Source.File.File != "/r/g/vdb.img" || k.Driver.Type != "raw" || k.Serial != "S1" {
		t.Errorf("replicated disk %+v", k)
	}
	if k := dv.Disks[2]; k.Device != "cdrom" || (k.Source != nil && k.Source.File != nil && k.Source.File.File != "") || k.ReadOnly == nil {
		t.Errorf("cdrom %+v", k)
	}
	for _, s := range dv.Serials {
		if s.Source.Pty == nil || s.Log != nil {
			t.Errorf("serial %+v", s)
		}
	}
	if c := dv.Consoles[0]; c.Source.Pty == nil || c.Protocol != nil || c.Target.Type != "virtio" {
		t.Errorf("console %+v", c)
	}
	if p := dv.Parallels[0]; p.Source.Pty == nil {
		t.Errorf("parallel %+v", p)
	}
	if c := dv.Channels[0]; c.Source.UNIX == nil || c.Source.UNIX.Mode != "bind" || c.Source.UNIX.Path != "" || c.Target.VirtIO.Name != "org.qemu.guest_agent.0" {
		t.Errorf("guest agent channel %+v", c.Source.UNIX)
	}
	if c := dv.Channels[1]; c.Source.Pty == nil {
		t.Errorf("file channel %+v", c.Source)
	}
	if c := dv.Channels[2]; c.Source.SpiceVMC == nil {
		t.Errorf("spicevmc channel %+v", c.Source)
	}
	if len(dv.Graphics) != 2 || dv.Graphics[0].VNC == nil || dv.Graphics[1].Spice == nil || dv.Graphics[1].Spice.AutoPort != "yes" ||
		dv.Graphics[1].Spice.Listeners[0].Address == nil || dv.Graphics[1].Spice.Listeners[1].Socket == nil {
		t.Errorf("graphics %+v", dv.Graphics)
	}
	if a := dv.Audios[0]; a.ID != 1 || a.None == nil {
		t.Errorf("audio %+v", a)
	}
	if c := dv.VSock.CID; c.Auto != "yes" || c.Address != "" {
		t.Errorf("vsock cid %+v", c)
	}
	if n := dv.Interfaces[2]; n.Backend == nil || n.Backend.Type != "passt" || n.Source.User == nil {
		t.Errorf("passt interface %+v", n)
	}
	if d.VCPU == nil || d.VCPU.Value != 2 {
		t.Errorf("vcpu %+v", d.VCPU)
	}
}

// Every element libvirtxml models is in exactly one table: a libvirtxml
// upgrade that models a new one fails here until someone decides.
func TestShellFieldTables(t *testing.T) {
	check := func(typ reflect.Type, kept, dropped map[string]bool, refused map[string]refusal) {
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i).Name
			n := 0
			if kept[f] {
				n++
			}
			if dropped[f] {
				n++
			}
			if _, ok := refused[f]; ok {
				n++
			}
			if n != 1 {
				t.Errorf("%s.%s is in %d of the tables", typ.Name(), f, n)
			}
		}
		for _, m := range []map[string]bool{kept, dropped} {
			for f := range m {
				if _, ok := typ.FieldByName(f); !ok {
					t.Errorf("%s has no field %s", typ.Name(), f)
				}
			}
		}
		for f := range refused {
			if _, ok := typ.FieldByName(f); !ok {
				t.Errorf("%s has no field %s", typ.Name(), f)
			}
		}
	}
	check(reflect.TypeOf(libvirtxml.Domain{}), domainKept, domainDropped, domainRefused)
	check(reflect.TypeOf(libvirtxml.DomainDeviceList{}), devicesKept, devicesDropped, devicesRefused)

	// An element in no table is refused by name.
	c := &shellCheck{}
	c.fields(reflect.ValueOf(libvirtxml.DomainDeviceList{Hubs: []libvirtxml.DomainHub{{Type: "usb"}}}), map[string]bool{}, nil, nil)
	if len(c.refused) != 1 || !strings.Contains(c.refused[0].what, "<hub>") {
		t.Errorf("unlisted element: %+v", c.refused)
	}
}
