package virt

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"

	"libvirt.org/go/libvirtxml"

	"github.com/remora-ha/remora/migrate/qemu"
)

// Domain XML is read and written with libvirtxml, never edited as text.

func parseDomain(x string) (*libvirtxml.Domain, error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil {
		return nil, fmt.Errorf("parse domain XML: %w", err)
	}
	return &d, nil
}

// SharedMemoryHowTo is the XML an admin adds to a domain to make it protectable.
const SharedMemoryHowTo = `add this inside <domain> (virsh edit GUEST), then restart the guest:
  <memoryBacking>
    <source type='file'/>
    <access mode='shared'/>
  </memoryBacking>
and point memory_backing_dir in /etc/libvirt/qemu.conf at tmpfs (e.g. /dev/shm/remora)`

// CheckSharedMemoryXML returns an error telling the admin what to add when
// the domain XML lacks shared file memory backing.
func CheckSharedMemoryXML(guest, domainXML string) error {
	if d, err := parseDomain(domainXML); err == nil && hasSharedFileMemory(d) {
		return nil
	}
	return noSharedMemory(guest)
}

func noSharedMemory(guest string) error {
	return fmt.Errorf("guest %q: %w; %s", guest, qemu.ErrNoSharedMemory, strings.ReplaceAll(SharedMemoryHowTo, "GUEST", guest))
}

func hasSharedFileMemory(d *libvirtxml.Domain) bool {
	mb := d.MemoryBacking
	return mb != nil && mb.MemorySource != nil && mb.MemorySource.Type == "file" &&
		mb.MemoryAccess != nil && mb.MemoryAccess.Mode == "shared"
}

func disks(d *libvirtxml.Domain) []libvirtxml.DomainDisk {
	if d.Devices == nil {
		return nil
	}
	return d.Devices.Disks
}

func diskDev(k libvirtxml.DomainDisk) string {
	if k.Target == nil {
		return ""
	}
	return k.Target.Dev
}

// WritableDisks lists the target devs (e.g. vda) of a domain's disks that
// the guest writes: device 'disk', neither read-only nor shared.
func WritableDisks(domainXML string) ([]string, error) {
	d, err := parseDomain(domainXML)
	if err != nil {
		return nil, err
	}
	var devs []string
	for _, k := range disks(d) {
		if (k.Device == "" || k.Device == "disk") && k.ReadOnly == nil && k.Shareable == nil && diskDev(k) != "" {
			devs = append(devs, diskDev(k))
		}
	}
	return devs, nil
}

// RawDiskFiles maps the target devs of a domain's writable raw file disks
// to their image files.
func RawDiskFiles(domainXML string) (map[string]string, error) {
	d, err := parseDomain(domainXML)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, k := range disks(d) {
		if (k.Device == "" || k.Device == "disk") && k.ReadOnly == nil && k.Shareable == nil && diskDev(k) != "" &&
			k.Driver != nil && k.Driver.Type == "raw" && k.Source != nil && k.Source.File != nil && k.Source.File.File != "" {
			out[diskDev(k)] = k.Source.File.File
		}
	}
	return out, nil
}

// DiskAlias returns the device alias libvirt gave the disk with target
// dev in a running domain's XML.
func DiskAlias(domainXML, dev string) (string, error) {
	d, err := parseDomain(domainXML)
	if err != nil {
		return "", err
	}
	var have []string
	for _, k := range disks(d) {
		if diskDev(k) != dev {
			have = append(have, diskDev(k))
			continue
		}
		if k.Alias == nil || k.Alias.Name == "" {
			return "", fmt.Errorf("disk %s has no alias (is the domain running?)", dev)
		}
		return k.Alias.Name, nil
	}
	return "", fmt.Errorf("no disk with target dev %q (disks: %s)", dev, strings.Join(have, ", "))
}

// InterfaceTap returns the host tap device of the network interface whose
// QEMU netdev is netdev (libvirt names it "host" + the device alias).
func InterfaceTap(domainXML, netdev string) (string, error) {
	d, err := parseDomain(domainXML)
	if err != nil {
		return "", err
	}
	alias, ok := strings.CutPrefix(netdev, "host")
	if !ok {
		return "", fmt.Errorf("netdev %q is not one libvirt named (host<alias>)", netdev)
	}
	var have []string
	if d.Devices != nil {
		for _, i := range d.Devices.Interfaces {
			name := ""
			if i.Alias != nil {
				name = i.Alias.Name
			}
			if name != alias {
				have = append(have, name)
				continue
			}
			if i.Target == nil || i.Target.Dev == "" {
				return "", fmt.Errorf("interface %s has no host tap device", alias)
			}
			return i.Target.Dev, nil
		}
	}
	return "", fmt.Errorf("no interface with alias %q (interfaces: %s)", alias, strings.Join(have, ", "))
}

// ShellOptions say how the standby's shell differs from the primary's domain.
type ShellOptions struct {
	Name string
	// Images maps a replicated disk's target dev to its replica image (a
	// raw file) on the standby; every one must be a disk of the domain.
	Images map[string]string
	// BootDirs are the directories a shell may take firmware, kernels,
	// initrds, device trees, ACPI tables and option ROMs from (absolute;
	// nil means DefaultBootDirs). libvirt hands these files to QEMU and
	// the guest can read them.
	BootDirs []string
	// LogDir, if set, is where the shell logs the character devices
	// (serial, console, ...) the primary logs, in files named after the
	// shell; if empty the shell logs none. A log path of the primary's is
	// never used.
	LogDir string
}

func (o ShellOptions) bootDirs() []string {
	if o.BootDirs == nil {
		return DefaultBootDirs()
	}
	return o.BootDirs
}

func (o ShellOptions) validate() error {
	if o.Name == "" || o.Name == "." || o.Name == ".." || strings.ContainsAny(o.Name, "/\x00") {
		return fmt.Errorf("standby shell name %q is not a valid domain name", o.Name)
	}
	for _, d := range o.BootDirs {
		if !filepath.IsAbs(d) || filepath.Clean(d) != d {
			return fmt.Errorf("boot directory %q is not an absolute, clean path", d)
		}
	}
	if o.LogDir != "" && !filepath.IsAbs(o.LogDir) {
		return fmt.Errorf("shell log directory %q is not absolute", o.LogDir)
	}
	return nil
}

// ShellXML derives the standby shell domain from the primary's migratable
// XML: same machine type and devices, a new name and identity, the replica
// images as its disks, started waiting for an incoming migration that the
// agent feeds at failover. The primary's XML is untrusted: anything that
// would give the shell a host device, host file, host program or QEMU
// argument is refused with an ErrUnsafeDomain error naming it (see
// CheckShellSource), and host-specific details (emulator, disk sources,
// log and socket paths, tuning, security labels) are dropped.
func ShellXML(primaryXML string, o ShellOptions) (string, error) {
	return shellXML(primaryXML, o, checkShellSource)
}

func parseShellSource(primaryXML string, o ShellOptions) (*libvirtxml.Domain, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	d, err := parseDomain(primaryXML)
	if err != nil {
		return nil, fmt.Errorf("primary domain XML: %w: cannot derive the standby shell", err)
	}
	if d.Name == "" {
		return nil, fmt.Errorf("primary domain XML has no <name>: cannot derive the standby shell")
	}
	if !hasSharedFileMemory(d) {
		return nil, noSharedMemory(o.Name)
	}
	return d, nil
}

// shellXML is ShellXML with its allow-list check as a parameter (tests
// disable it to show what it stops).
func shellXML(primaryXML string, o ShellOptions, check func(*libvirtxml.Domain, ShellOptions) error) (string, error) {
	d, err := parseShellSource(primaryXML, o)
	if err != nil {
		return "", err
	}
	if err := check(d, o); err != nil {
		return "", err
	}
	sanitizeShell(d, o)
	if err := shellDisks(d, o.Images); err != nil {
		return "", err
	}
	if d.QEMUCommandline == nil {
		d.QEMUCommandline = &libvirtxml.DomainQEMUCommandline{}
	}
	d.QEMUCommandline.Args = append(d.QEMUCommandline.Args,
		libvirtxml.DomainQEMUCommandlineArg{Value: "-incoming"}, libvirtxml.DomainQEMUCommandlineArg{Value: "defer"})
	markShell(d)
	return d.Marshal()
}

// WaitsForIncoming reports whether domainXML starts QEMU waiting for an
// incoming migration (-incoming, as a standby shell does): such a domain
// runs no guest until someone feeds it a state.
func WaitsForIncoming(domainXML string) bool {
	d, err := parseDomain(domainXML)
	if err != nil || d.QEMUCommandline == nil {
		return false
	}
	for _, a := range d.QEMUCommandline.Args {
		if a.Value == "-incoming" {
			return true
		}
	}
	return false
}

// ShellMetadataURI marks, in a domain's metadata, a domain remora made: a
// standby shell, or the guest such a shell became after a failover.
const ShellMetadataURI = "https://github.com/remora-ha/remora/shell"

var shellMark = regexp.MustCompile(`<remora-shell:shell\b[^>]*?(/>|>[^<]*</remora-shell:shell>)`)

// markShell puts remora's mark in d's metadata (once).
func markShell(d *libvirtxml.Domain) {
	var old string
	if d.Metadata != nil {
		old = shellMark.ReplaceAllString(d.Metadata.XML, "")
	}
	d.Metadata = &libvirtxml.DomainMetadata{XML: `<remora-shell:shell xmlns:remora-shell="` + ShellMetadataURI + `"/>` + old}
}

// IsShell reports whether domainXML is of a domain remora made (a shell,
// or the guest one became), by its metadata mark.
func IsShell(domainXML string) bool {
	d, err := parseDomain(domainXML)
	return err == nil && d.Metadata != nil && strings.Contains(d.Metadata.XML, ShellMetadataURI)
}

// WithoutIncoming drops the -incoming defer a shell was started with, for
// the definition of the guest it became.
func WithoutIncoming(domainXML string) (string, error) {
	d, err := parseDomain(domainXML)
	if err != nil {
		return "", err
	}
	if cl := d.QEMUCommandline; cl != nil {
		var args []libvirtxml.DomainQEMUCommandlineArg
		for i := 0; i < len(cl.Args); i++ {
			if cl.Args[i].Value == "-incoming" && i+1 < len(cl.Args) {
				i++ // and its value
				continue
			}
			args = append(args, cl.Args[i])
		}
		cl.Args = args
		if len(cl.Args) == 0 && len(cl.Envs) == 0 {
			d.QEMUCommandline = nil
		}
	}
	return d.Marshal()
}

// shellDisks points the shell's disks at the standby's replica images.
func shellDisks(d *libvirtxml.Domain, images map[string]string) error {
	done := map[string]bool{}
	if d.Devices != nil {
		for i := range d.Devices.Disks {
			k := &d.Devices.Disks[i]
			img, ok := images[diskDev(*k)]
			if !ok {
				continue
			}
			if k.Source == nil {
				return fmt.Errorf("disk %s has no <source>", diskDev(*k))
			}
			done[diskDev(*k)] = true
			*k = shellDisk(*k, &img)
		}
	}
	for dev := range images {
		if !done[dev] {
			return fmt.Errorf("shell XML has no disk %s for its replica image", dev)
		}
	}
	return nil
}
