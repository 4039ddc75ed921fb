package virt

import (
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"reflect"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// A standby builds its shell from domain XML a primary sent over the
// network, so that XML is untrusted: ShellXML takes from it only what an
// allow-list says is safe on the standby's host. Every element libvirtxml
// models is either kept (emulated hardware, guest-visible settings),
// dropped or rewritten (harmless but host-specific: tuning, pinning, log
// and socket paths, security labels, the emulator) or refused with the
// element named (host devices, host files, host programs, QEMU arguments).
// An element libvirtxml does not model never reaches the shell, since the
// shell is marshalled from the parsed form; one it models but the tables
// below do not list is refused, so a libvirtxml upgrade cannot widen the
// list unreviewed.

// ErrUnsafeDomain marks the error of a primary's domain XML that a standby
// refuses to build a shell from (errors.Is).
var ErrUnsafeDomain = errors.New("unsafe domain XML for a standby shell")

type refusedError struct{ msg string }

func (e *refusedError) Error() string        { return e.msg }
func (e *refusedError) Is(target error) bool { return target == ErrUnsafeDomain }

// DefaultBootDirs are the directories a shell takes firmware, kernels,
// initrds, device trees, ACPI tables and option ROMs from when
// ShellOptions.BootDirs is nil: the distributions' QEMU firmware
// directories and libvirt's boot directory.
func DefaultBootDirs() []string {
	return []string{
		"/usr/share/qemu", "/usr/local/share/qemu", "/usr/share/seabios", "/usr/share/seavgabios",
		"/usr/share/OVMF", "/usr/share/ovmf", "/usr/share/edk2", "/usr/share/edk2-ovmf",
		"/usr/share/AAVMF", "/usr/share/qemu-efi-aarch64", "/usr/share/ipxe", "/usr/lib/ipxe",
		"/var/lib/libvirt/boot",
	}
}

// What a standby accepts instead, said after each refusal.
const (
	acceptEmulated = "a standby builds shells only from emulated devices"
	acceptDisks    = "a standby opens no storage of the primary's, only its own replica images of the disks remora replicates (writable, of type file, block, network or volume), and gives a shell CD-ROM and floppy drives empty"
	acceptQEMU     = "a standby passes QEMU nothing from the primary but its own -incoming defer"
	acceptNet      = "a standby's shells have interfaces of type network, bridge, ethernet or user only, without scripts, host addresses, routes or port forwards"
	acceptKVM      = "a standby builds shells only for QEMU/KVM guests (domain type qemu or kvm)"
	acceptNoGPU    = "a standby's shells have emulated displays (VNC or SPICE) without host GPU acceleration"
	acceptRNG      = "a standby's shells take entropy only from /dev/urandom, /dev/random or QEMU's builtin backend"
	acceptMemory   = "remora replicates the guest's main RAM only, and a standby maps no host files into a shell"
)

type refusal struct {
	what    string // the element, e.g. "<hostdev> (a host device)"
	accepts string // what the standby takes instead
}

// Top-level elements of <domain>, by libvirtxml field. Fields listed in
// none of these maps are refused (shellCheck.fields).
var (
	// domainKept go into the shell as the primary has them, or checked
	// and edited by checkShellSource and sanitizeShell.
	domainKept = fieldSet("XMLName", "Type", "ID", "Name", "UUID", "GenID", "Title", "Description", "Metadata",
		"MaximumMemory", "Memory", "CurrentMemory", "MemoryBacking", "VCPU", "VCPUs",
		"IOThreads", "IOThreadIDs", "DefaultIOThread", "SysInfo", "OS", "Features", "CPU", "Clock",
		"OnPoweroff", "OnReboot", "OnCrash", "PM", "Devices", "KeyWrap", "QEMUCommandline")
	// domainDropped are harmless but host-specific: resource tuning and
	// pinning to the primary host's CPUs, NUMA nodes, cgroups and block
	// devices (the standby's admin decides those), LXC id maps, perf
	// counters, and security labels: without them the standby's libvirt
	// confines and labels the shell with its own defaults, so a primary
	// can neither weaken confinement (type='none', relabel='no') nor pick
	// a static label (a DAC label 0:0 would run the shell as root).
	domainDropped = fieldSet("BlockIOTune", "MemoryTune", "CPUTune", "NUMATune", "Resource", "IDMap", "Perf", "SecLabel")
	domainRefused = map[string]refusal{
		"Bootloader":           {"<bootloader> (a host program that boots the guest)", acceptKVM},
		"BootloaderArgs":       {"<bootloader_args> (arguments of a host boot program)", acceptKVM},
		"LaunchSecurity":       {"<launchSecurity> (encrypted guest memory)", "a standby can replicate only guests whose RAM it can read"},
		"QEMUCapabilities":     {"<qemu:capabilities> (QEMU capability overrides)", acceptQEMU},
		"QEMUOverride":         {"<qemu:override> (QEMU device property overrides)", acceptQEMU},
		"QEMUDeprecation":      {"<qemu:deprecation> (QEMU deprecation behaviour)", acceptQEMU},
		"LXCNamespace":         {"<lxc:namespace> (host namespaces)", acceptKVM},
		"BHyveCommandline":     {"<bhyve:commandline> (hypervisor arguments)", acceptKVM},
		"VMWareDataCenterPath": {"<vmware:datacenterpath>", acceptKVM},
		"XenCommandline":       {"<xen:commandline> (hypervisor arguments)", acceptKVM},
	}
)

// Elements of <devices>, by libvirtxml field, as above.
var (
	devicesKept = fieldSet("Disks", "Controllers", "Interfaces", "Serials", "Parallels", "Consoles", "Channels",
		"Inputs", "Graphics", "Sounds", "Audios", "Videos", "Hubs", "Watchdog", "MemBalloon", "RNGs",
		"NVRAM", "Panics", "IOMMU", "VSock")
	// devicesDropped: the emulator is a path on the primary's host (the
	// standby's libvirt picks its own for the machine); redirection
	// filters mean nothing without <redirdev>, which is refused.
	devicesDropped = fieldSet("Emulator", "RedirFilters")
	devicesRefused = map[string]refusal{
		"Leases":      {"<lease> (a lock manager lease on host storage)", acceptEmulated},
		"Filesystems": {"<filesystem> (a host directory passed through)", acceptEmulated},
		"Smartcards":  {"<smartcard> (host certificates or a host smartcard)", acceptEmulated},
		"TPMs":        {"<tpm> (a host TPM or TPM emulator state)", acceptEmulated},
		"Hostdevs":    {"<hostdev> (a host device)", acceptEmulated},
		"RedirDevs":   {"<redirdev> (a redirected USB device)", acceptEmulated},
		"Shmems":      {"<shmem> (host shared memory)", acceptEmulated},
		"Memorydevs":  {"<memory> device (a DIMM, NVDIMM or virtio-mem/pmem)", acceptMemory},
	}
)

func fieldSet(names ...string) map[string]bool {
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[n] = true
	}
	return m
}

// CheckShellSource returns an ErrUnsafeDomain error naming every element of
// the primary's domain XML that ShellXML would refuse to build o's shell
// from (or the error ShellXML gives for XML it cannot use at all: malformed,
// nameless, without shared memory), or nil. A standby may call it on first
// contact, before it creates anything for the guest; only the keys of
// o.Images matter.
func CheckShellSource(primaryXML string, o ShellOptions) error {
	d, err := parseShellSource(primaryXML, o)
	if err != nil {
		return err
	}
	return checkShellSource(d, o)
}

// checkShellSource refuses; it does not edit d (sanitizeShell does).
func checkShellSource(d *libvirtxml.Domain, o ShellOptions) error {
	c := &shellCheck{boot: o.bootDirs()}
	c.fields(reflect.ValueOf(d).Elem(), domainKept, domainDropped, domainRefused)
	if d.Type != "qemu" && d.Type != "kvm" {
		c.refuse(fmt.Sprintf("<domain type=%s>", quoteAttr(d.Type)), acceptKVM)
	}
	if d.Metadata != nil && hasDirective(d.Metadata.XML) {
		c.refuse("<metadata> with an XML declaration (<!...>)", "a standby keeps metadata only as plain elements")
	}
	for _, s := range d.SysInfo {
		if s.FWCfg != nil {
			for _, e := range s.FWCfg.Entry {
				if e.File != "" {
					c.refuse(fmt.Sprintf("<sysinfo type='fwcfg'> entry %q from the host file %q", e.Name, e.File), "a standby gives a guest firmware settings as values only, never host files")
				}
			}
		}
	}
	if b := d.OS; b != nil {
		if l := b.Loader; l != nil {
			if l.Path != "" {
				c.bootFile("<loader> (firmware)", l.Path)
			}
			if l.Readonly == "no" || (l.Type == "pflash" && l.Readonly != "yes") {
				c.refuse("<loader> that is not read-only (a firmware file the guest writes)", "a standby gives a shell read-only firmware and its own NVRAM")
			}
		}
		if b.NVRam != nil && b.NVRam.Template != "" {
			c.bootFile("<nvram template> (an NVRAM template)", b.NVRam.Template)
		}
		c.bootFile("<kernel>", b.Kernel)
		c.bootFile("<initrd>", b.Initrd)
		c.bootFile("<dtb> (a device tree)", b.DTB)
		if b.ACPI != nil {
			for _, t := range b.ACPI.Tables {
				c.bootFile("<acpi><table> (an ACPI table)", t.Path)
			}
		}
	}
	if cl := d.QEMUCommandline; cl != nil && !isIncomingDefer(cl) {
		c.refuse("<qemu:commandline> (arbitrary QEMU arguments)", acceptQEMU)
	}
	if dev := d.Devices; dev != nil {
		c.fields(reflect.ValueOf(dev).Elem(), devicesKept, devicesDropped, devicesRefused)
		c.devices(dev, o)
	}
	if len(c.refused) == 0 {
		return nil
	}
	// Refusals with the same remedy are listed together, before it.
	var accepts []string
	byAccepts := map[string][]string{}
	for _, r := range c.refused {
		if byAccepts[r.accepts] == nil {
			accepts = append(accepts, r.accepts)
		}
		byAccepts[r.accepts] = append(byAccepts[r.accepts], r.what)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "guest %q: the primary's domain XML has ", d.Name)
	for i, a := range accepts {
		if i > 0 {
			b.WriteString("; it also has ")
		}
		fmt.Fprintf(&b, "%s: %s", strings.Join(byAccepts[a], ", and "), a)
	}
	pronoun := "it"
	if len(c.refused) > 1 {
		pronoun = "them"
	}
	fmt.Fprintf(&b, "; remove %s from the guest or protect the guest without remora", pronoun)
	return &refusedError{b.String()}
}

type shellCheck struct {
	boot    []string
	refused []refusal
	seen    map[string]bool
}

func (c *shellCheck) refuse(what, accepts string) {
	if c.seen[what] {
		return
	}
	if c.seen == nil {
		c.seen = map[string]bool{}
	}
	c.seen[what] = true
	c.refused = append(c.refused, refusal{what, accepts})
}

// fields refuses the non-empty fields of struct v that the tables list as
// refused or do not list at all.
func (c *shellCheck) fields(v reflect.Value, kept, dropped map[string]bool, refused map[string]refusal) {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if v.Field(i).IsZero() || kept[f.Name] || dropped[f.Name] {
			continue
		}
		if r, ok := refused[f.Name]; ok {
			c.refuse(r.what, r.accepts)
			continue
		}
		c.refuse(fmt.Sprintf("<%s> (an element this standby does not know to be safe)", elementName(f)), acceptEmulated)
	}
}

// elementName is the XML name of a libvirtxml field.
func elementName(f reflect.StructField) string {
	tag, _, _ := strings.Cut(f.Tag.Get("xml"), ",")
	if _, local, ok := strings.Cut(tag, " "); ok {
		tag = local
	}
	if tag == "" || tag == "-" {
		return f.Name
	}
	return tag
}

// bootFile refuses a host file outside the boot directories. libvirt hands
// such files to QEMU (relabelling them for it) and the guest can read
// them, so a primary must not name, say, /etc/shadow.
func (c *shellCheck) bootFile(what, path string) {
	if path == "" || inDirs(path, c.boot) {
		return
	}
	c.refuse(fmt.Sprintf("%s %q outside the standby's boot directories", what, path),
		"a standby gives a shell firmware, kernels, initrds, device trees, ACPI tables and option ROMs only from "+strings.Join(c.boot, ", "))
}

func inDirs(path string, dirs []string) bool {
	if !filepath.IsAbs(path) || filepath.Clean(path) != path {
		return false
	}
	for _, d := range dirs {
		if d == "/" || strings.HasPrefix(path, d+"/") {
			return true
		}
	}
	return false
}

func (c *shellCheck) devices(dev *libvirtxml.DomainDeviceList, o ShellOptions) {
	for _, k := range dev.Disks {
		c.disk(k, o.Images)
	}
	for _, i := range dev.Interfaces {
		c.iface(i)
	}
	for _, ch := range dev.Channels {
		switch t := ch.Target; {
		case t == nil || (t.VirtIO == nil && t.GuestFWD == nil && t.Xen == nil):
			c.refuse("<channel> of an unknown target type", "a standby's shells have virtio channels only")
		case t.GuestFWD != nil:
			c.refuse("<channel><target type='guestfwd'> (guest connections forwarded to the host)", "a standby's shells have virtio channels only")
		case t.Xen != nil:
			c.refuse("<channel><target type='xen'>", "a standby's shells have virtio channels only")
		}
	}
	for _, in := range dev.Inputs {
		if in.Type == "passthrough" || in.Type == "evdev" || (in.Source != nil && (in.Source.Passthrough != nil || in.Source.EVDev != nil)) {
			c.refuse(fmt.Sprintf("<input type=%s> (a host input device)", quoteAttr(in.Type)), acceptEmulated)
		}
	}
	for _, g := range dev.Graphics {
		if graphicsGL(g) {
			c.refuse("<graphics> with OpenGL (the host's GPU)", acceptNoGPU)
		}
	}
	for _, v := range dev.Videos {
		if v.Driver != nil && v.Driver.Name == "vhostuser" {
			c.refuse("<video><driver name='vhostuser'> (a host GPU process)", acceptNoGPU)
		}
		if v.Model.Accel != nil && v.Model.Accel.Accel3D == "yes" {
			c.refuse("<video> with accel3d (the host's GPU)", acceptNoGPU)
		}
	}
	for _, r := range dev.RNGs {
		switch b := r.Backend; {
		case b == nil || b.BuiltIn != nil:
		case b.EGD != nil:
			c.refuse("<rng><backend model='egd'> (an entropy daemon reached through a host socket or device)", acceptRNG)
		case b.Random != nil && b.Random.Device != "" && b.Random.Device != "/dev/urandom" && b.Random.Device != "/dev/random":
			c.refuse(fmt.Sprintf("<rng><backend model='random'> from %q", b.Random.Device), acceptRNG)
		}
	}
}

func (c *shellCheck) disk(k libvirtxml.DomainDisk, images map[string]string) {
	dev, typ := diskDev(k), diskType(k.Source)
	refuse := func(why string) {
		what := fmt.Sprintf("disk %s (<disk type=%s device=%s>", dev, quoteAttr(typ), quoteAttr(deviceOr(k.Device, "disk")))
		if p := diskSourcePath(k.Source); p != "" {
			what += fmt.Sprintf(", source %q", p)
		}
		c.refuse(what+"), "+why, acceptDisks)
	}
	if _, ok := images[dev]; ok && dev != "" {
		switch typ {
		case "file", "block", "network", "volume":
		default:
			refuse("not storage remora can replicate")
		}
		if k.Device != "" && k.Device != "disk" {
			refuse("replicated, but not a disk")
		}
		return
	}
	switch {
	case k.Device == "cdrom" || k.Device == "floppy":
		return // the shell gets the drive empty
	case k.Device == "lun":
		refuse("a host SCSI device passed through")
	case typ == "block":
		refuse("a host block device that is not one of the replicated disks")
	case k.ReadOnly != nil || k.Shareable != nil:
		refuse("read-only or shareable, so not replicated, and the standby would open the primary's source")
	default:
		refuse("not one of the replicated disks, so the standby would open the primary's source")
	}
}

func (c *shellCheck) iface(i libvirtxml.DomainInterface) {
	typ := interfaceType(i.Source)
	what := "an <interface> of type " + typ
	if typ == "" {
		what = "an <interface> of an unknown type"
	}
	switch typ {
	case "network", "bridge", "ethernet", "user":
	case "direct":
		c.refuse(what+" (a host NIC through macvtap)", acceptNet)
	case "hostdev":
		c.refuse(what+" (a host PCI device)", acceptNet)
	case "vhostuser":
		c.refuse(what+" (a host vhost-user socket)", acceptNet)
	case "vdpa":
		c.refuse(what+" (a host vDPA device)", acceptNet)
	case "server", "client", "mcast", "udp":
		c.refuse(what+" (a socket to an address the primary names)", acceptNet)
	default:
		c.refuse(what+" (a backend this standby does not run)", acceptNet)
	}
	if i.Script != nil || i.DownScript != nil {
		c.refuse(what+" with a <script> or <downscript> (a host program)", acceptNet)
	}
	if typ == "ethernet" && (len(i.IP) > 0 || len(i.Route) > 0 || (i.Source.Ethernet != nil && (len(i.Source.Ethernet.IP) > 0 || len(i.Source.Ethernet.Route) > 0))) {
		c.refuse(what+" with <ip> or <route> (addresses and routes on the standby host)", acceptNet)
	}
	if len(i.PortForward) > 0 {
		c.refuse(what+" with <portForward> (ports opened on the standby host)", acceptNet)
	}
	if i.ROM != nil && i.ROM.File != "" {
		c.bootFile("<interface><rom> (an option ROM)", i.ROM.File)
	}
}

func graphicsGL(g libvirtxml.DomainGraphic) bool {
	switch {
	case g.EGLHeadless != nil:
		return true
	case g.Spice != nil:
		return g.Spice.GL != nil && g.Spice.GL.Enable == "yes"
	case g.SDL != nil:
		return g.SDL.GL != nil && g.SDL.GL.Enable == "yes"
	case g.DBus != nil:
		return g.DBus.GL != nil && g.DBus.GL.Enable == "yes"
	}
	return false
}

// isIncomingDefer reports whether cl is what a shell of remora's own has
// (a guest that failed over and is protected again): -incoming defer.
func isIncomingDefer(cl *libvirtxml.DomainQEMUCommandline) bool {
	if len(cl.Envs) > 0 || len(cl.Args)%2 != 0 {
		return false
	}
	for i := 0; i < len(cl.Args); i += 2 {
		if cl.Args[i].Value != "-incoming" || cl.Args[i+1].Value != "defer" {
			return false
		}
	}
	return true
}

// hasDirective reports whether raw XML holds a <!DOCTYPE, <!ENTITY or
// other declaration (comments and CDATA are harmless), or does not parse.
func hasDirective(raw string) bool {
	dec := xml.NewDecoder(strings.NewReader("<m>" + raw + "</m>"))
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return false
		}
		if err != nil {
			return true
		}
		if _, ok := tok.(xml.Directive); ok {
			return true
		}
	}
}

func quoteAttr(s string) string {
	if strings.ContainsAny(s, "'<>&\"\n") {
		return fmt.Sprintf("%q", s)
	}
	return "'" + s + "'"
}

func deviceOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func diskType(s *libvirtxml.DomainDiskSource) string {
	switch {
	case s == nil:
		return ""
	case s.File != nil:
		return "file"
	case s.Block != nil:
		return "block"
	case s.Dir != nil:
		return "dir"
	case s.Network != nil:
		return "network"
	case s.Volume != nil:
		return "volume"
	case s.NVME != nil:
		return "nvme"
	case s.VHostUser != nil:
		return "vhostuser"
	}
	return ""
}

func diskSourcePath(s *libvirtxml.DomainDiskSource) string {
	switch {
	case s == nil:
	case s.File != nil:
		return s.File.File
	case s.Block != nil:
		return s.Block.Dev
	case s.Dir != nil:
		return s.Dir.Dir
	case s.Network != nil:
		return s.Network.Protocol + ":" + s.Network.Name
	case s.Volume != nil:
		return s.Volume.Pool + "/" + s.Volume.Volume
	}
	return ""
}

func interfaceType(s *libvirtxml.DomainInterfaceSource) string {
	switch {
	case s == nil:
		return ""
	case s.Network != nil:
		return "network"
	case s.Bridge != nil:
		return "bridge"
	case s.Ethernet != nil:
		return "ethernet"
	case s.User != nil:
		return "user"
	case s.Direct != nil:
		return "direct"
	case s.Hostdev != nil:
		return "hostdev"
	case s.VHostUser != nil:
		return "vhostuser"
	case s.VDPA != nil:
		return "vdpa"
	case s.Server != nil:
		return "server"
	case s.Client != nil:
		return "client"
	case s.MCast != nil:
		return "mcast"
	case s.UDP != nil:
		return "udp"
	case s.Internal != nil:
		return "internal"
	case s.Null != nil:
		return "null"
	case s.VDS != nil:
		return "vds"
	}
	return ""
}

// sanitizeShell drops and rewrites what checkShellSource let through but a
// shell must not take from the primary as it is. It runs after the check,
// and keeps what the check refuses, so a missing check shows in the shell.
func sanitizeShell(d *libvirtxml.Domain, o ShellOptions) {
	zeroFields(reflect.ValueOf(d).Elem(), domainDropped)
	d.Name, d.UUID, d.ID = o.Name, "", nil
	if d.VCPU != nil {
		d.VCPU.CPUSet = "" // pinning to the primary host's CPUs
	}
	if b := d.OS; b != nil {
		// Container init settings mean nothing to QEMU.
		b.Init, b.InitArgs, b.InitEnv, b.InitDir, b.InitUser, b.InitGroup = "", nil, nil, "", "", ""
		// The primary's NVRAM file is its own: libvirt makes the shell
		// one (named after it) from the template. The guest's variables
		// arrive with the checkpoints (the flash is migrated state).
		if b.NVRam != nil {
			if b.NVRam.Template != "" {
				b.NVRam = &libvirtxml.DomainNVRam{Template: b.NVRam.Template}
			} else {
				b.NVRam = nil
			}
		}
	}
	// ShellXML adds the shell's own -incoming defer.
	if cl := d.QEMUCommandline; cl != nil && isIncomingDefer(cl) {
		d.QEMUCommandline = nil
	}
	dev := d.Devices
	if dev == nil {
		return
	}
	zeroFields(reflect.ValueOf(dev).Elem(), devicesDropped)
	for i := range dev.Disks {
		if _, ok := o.Images[diskDev(dev.Disks[i])]; !ok && (dev.Disks[i].Device == "cdrom" || dev.Disks[i].Device == "floppy") {
			dev.Disks[i] = shellDisk(dev.Disks[i], nil)
		}
	}
	for i := range dev.Interfaces {
		n := &dev.Interfaces[i]
		n.Target = nil        // libvirt names a new tap: never one of the host's
		n.Managed = ""        // (hostdev interfaces only)
		n.BackendDomain = nil // (Xen only)
		if n.Backend != nil {
			// Host device paths (tap, vhost) and a passt log file go;
			// the backend type stays (QEMU may have no slirp).
			n.Backend = &libvirtxml.DomainInterfaceBackend{Type: n.Backend.Type}
			if n.Backend.Type == "" {
				n.Backend = nil
			}
		}
		if n.Source != nil && n.Source.User != nil {
			n.Source.User = &libvirtxml.DomainInterfaceSourceUser{} // (a host interface passt binds)
		}
	}
	// Character devices keep their guest side (the device set must match
	// the primary's for the checkpoints to load) but get a pty of their
	// own as the host side: a file, pipe, socket, host tty or log path of
	// the primary's is never opened on the standby. Dropping the devices
	// would break the restore; refusing them would refuse ordinary guests.
	for i := range dev.Serials {
		s := &dev.Serials[i]
		s.Source, s.Protocol, s.Log = ptySource(), nil, o.chardevLog(s.Log, "serial", i)
	}
	for i := range dev.Consoles {
		s := &dev.Consoles[i]
		s.TTY, s.Source, s.Protocol, s.Log = "", ptySource(), nil, o.chardevLog(s.Log, "console", i)
	}
	for i := range dev.Parallels {
		s := &dev.Parallels[i]
		s.Source, s.Protocol, s.Log = ptySource(), nil, o.chardevLog(s.Log, "parallel", i)
	}
	for i := range dev.Channels {
		s := &dev.Channels[i]
		s.Log = o.chardevLog(s.Log, "channel", i)
		switch src := s.Source; {
		case src != nil && src.UNIX != nil:
			// libvirt makes a socket of the shell's own (e.g. for
			// qemu-guest-agent) when it has no path.
			s.Source = &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: "bind"}}
		case src != nil && (src.SpiceVMC != nil || src.SpicePort != nil || src.QEMUVDAgent != nil || src.Null != nil):
		default:
			s.Source, s.Protocol = ptySource(), nil
		}
	}
	graphics := dev.Graphics[:0]
	for _, g := range dev.Graphics {
		switch {
		// Listen addresses and fixed ports are the primary host's (and a
		// primary's migratable XML has no VNC password): the shell
		// listens where the standby's qemu.conf says, on ports libvirt
		// picks.
		case g.VNC != nil:
			v := g.VNC
			v.Socket, v.Listen, v.Port, v.AutoPort = "", "", 0, "yes"
			if v.WebSocket != 0 {
				v.WebSocket = -1
			}
			defaultListeners(v.Listeners)
		case g.Spice != nil:
			sp := g.Spice
			sp.Listen, sp.Port, sp.TLSPort, sp.AutoPort = "", 0, 0, "yes"
			defaultListeners(sp.Listeners)
		case graphicsGL(g): // refused
		default:
			continue // SDL, RDP, desktop, D-Bus: the primary host's display
		}
		graphics = append(graphics, g)
	}
	dev.Graphics = graphics
	for i := range dev.Audios {
		a := &dev.Audios[i]
		if a.None == nil && a.SPICE == nil {
			// Host sound servers, devices and files: no sound on the
			// standby's host (a backend is not guest state).
			*a = libvirtxml.DomainAudio{ID: a.ID, TimerPeriod: a.TimerPeriod, None: &libvirtxml.DomainAudioNone{}}
		}
	}
	for i := range dev.Videos {
		if a := dev.Videos[i].Model.Accel; a != nil {
			a.RenderNode = ""
		}
	}
	if dev.VSock != nil {
		dev.VSock.CID = &libvirtxml.DomainVSockCID{Auto: "yes"} // CIDs are per host
	}
}

func zeroFields(v reflect.Value, names map[string]bool) {
	for n := range names {
		f := v.FieldByName(n)
		f.Set(reflect.Zero(f.Type()))
	}
}

func ptySource() *libvirtxml.DomainChardevSource {
	return &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}}
}

// defaultListeners clears the addresses and socket paths of graphics
// listeners: libvirt gives the shell the standby's default address and a
// socket of its own.
func defaultListeners(ls []libvirtxml.DomainGraphicListener) {
	for i := range ls {
		switch {
		case ls[i].Address != nil:
			ls[i].Address = &libvirtxml.DomainGraphicListenerAddress{}
		case ls[i].Socket != nil:
			ls[i].Socket = &libvirtxml.DomainGraphicListenerSocket{}
		}
	}
}

// chardevLog is the shell's log for a character device the primary logs:
// a file in o.LogDir named after the shell, or none.
func (o ShellOptions) chardevLog(l *libvirtxml.DomainChardevLog, kind string, i int) *libvirtxml.DomainChardevLog {
	if l == nil || o.LogDir == "" {
		return nil
	}
	return &libvirtxml.DomainChardevLog{File: filepath.Join(o.LogDir, fmt.Sprintf("%s.%s%d.log", o.Name, kind, i)), Append: l.Append}
}

// shellDisk is the shell's copy of disk k: its guest side, and as its
// source the replica image (none for an empty drive). Nothing of the
// primary's storage stays: source, backing chain, mirror, encryption,
// authentication.
func shellDisk(k libvirtxml.DomainDisk, image *string) libvirtxml.DomainDisk {
	n := libvirtxml.DomainDisk{
		Device: k.Device, Model: k.Model, Driver: k.Driver, Geometry: k.Geometry, BlockIO: k.BlockIO,
		Target: k.Target, IOTune: k.IOTune, ReadOnly: k.ReadOnly, Shareable: k.Shareable, Transient: k.Transient,
		Serial: k.Serial, WWN: k.WWN, Vendor: k.Vendor, Product: k.Product, Boot: k.Boot, ACPI: k.ACPI,
		Alias: k.Alias, Address: k.Address,
	}
	if image != nil {
		n.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: *image}}
		if n.Driver == nil {
			n.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu"}
		} else {
			drv := *n.Driver
			n.Driver = &drv
		}
		n.Driver.Type = "raw"
	}
	return n
}
