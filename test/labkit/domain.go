package labkit

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// GuestOptions describe a lab guest. Zero fields take the defaults noted.
type GuestOptions struct {
	Name        string // domain name (required): letters, digits, '-', '_', '.'
	IP          string // guest address on the bridge (required), e.g. GuestIP(0)
	Gateway     string // default BridgeIP
	MAC         string // default GuestMAC(IP)
	MemoryMiB   int    // default 256
	Machine     string // default "pc" (i440fx)
	RegionPages int    // integrity region in 4 KiB pages; default 8192 (32 MiB)
	Rate        int    // initial writer rate, pages/s; default 2000; negative: stopped
	Kernel      string // default KernelPath()
	Initrd      string // default InitrdPath()
	ConsoleLog  string // default ConsoleLogPath(Name)
	Cmdline     string // appended to the kernel command line
	// Incoming makes the domain a standby shell: QEMU starts with
	// "-incoming defer" and waits for migrate-incoming. Start it paused.
	Incoming bool
	// DataDisk is a raw image file attached as a virtio disk with
	// cache='none' (what a mirrored disk needs: no host page cache between
	// the guest's write and QEMU's completion of it). The guest has no
	// other disk, so it is /dev/vda inside; the workload's disk writer uses
	// it (remora.disk=). Empty: no disk.
	DataDisk string
	// DataDiskTarget is the libvirt target dev of DataDisk; default "vda".
	DataDiskTarget string
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

func (o GuestOptions) withDefaults() (GuestOptions, error) {
	if !nameRE.MatchString(o.Name) {
		return o, fmt.Errorf("labkit: bad domain name %q", o.Name)
	}
	if net.ParseIP(o.IP).To4() == nil {
		return o, fmt.Errorf("labkit: guest %s: bad IPv4 address %q", o.Name, o.IP)
	}
	if o.Gateway == "" {
		o.Gateway = BridgeIP
	}
	if o.MAC == "" {
		o.MAC = GuestMAC(o.IP)
	}
	if _, err := net.ParseMAC(o.MAC); err != nil {
		return o, fmt.Errorf("labkit: guest %s: bad MAC %q", o.Name, o.MAC)
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = DefaultMemoryMiB
	}
	if o.Machine == "" {
		o.Machine = DefaultMachine
	}
	if o.RegionPages == 0 {
		o.RegionPages = DefaultRegionPages
	}
	if o.Rate == 0 {
		o.Rate = DefaultRate
	}
	if o.Kernel == "" {
		o.Kernel = KernelPath()
	}
	if o.Initrd == "" {
		o.Initrd = InitrdPath()
	}
	if o.ConsoleLog == "" {
		o.ConsoleLog = ConsoleLogPath(o.Name)
	}
	if o.DataDisk != "" && o.DataDiskTarget == "" {
		o.DataDiskTarget = DefaultDataDiskTarget
	}
	if region := o.RegionPages * 4096 >> 20; region+96 > o.MemoryMiB {
		return o, fmt.Errorf("labkit: guest %s: %d MiB of RAM is too small for a %d MiB region", o.Name, o.MemoryMiB, region)
	}
	return o, nil
}

// KernelCmdline is the guest kernel command line for o (defaults applied).
func (o GuestOptions) KernelCmdline() string {
	o, _ = o.withDefaults()
	s := fmt.Sprintf("console=ttyS0 panic=1 remora.ip=%s/%d remora.gw=%s remora.region_pages=%d remora.rate=%d",
		o.IP, PrefixLen, o.Gateway, o.RegionPages, max(o.Rate, 0))
	if o.DataDisk != "" {
		s += " remora.disk=/dev/vda"
	}
	if o.Cmdline != "" {
		s += " " + o.Cmdline
	}
	return s
}

func esc(s string) string {
	var b bytes.Buffer
	xml.EscapeText(&b, []byte(s))
	return strings.ReplaceAll(b.String(), "'", "&#39;")
}

// DomainXML returns the libvirt domain for o. Invalid options (no name, no
// IP, ...) panic; Boot validates them and returns an error instead.
//
// TCG (type='qemu'), one vCPU, RAM in a shared file (memoryBacking source
// file, access shared), direct kernel boot of the lab image, no disk but
// DataDisk, no VGA, no USB, no balloon; one virtio NIC on the lab bridge (libvirt names
// its netdev hostnet0); ttyS0 on a pty and logged to o.ConsoleLog.
func DomainXML(o GuestOptions) string {
	o, err := o.withDefaults()
	if err != nil {
		panic(err)
	}
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n")
	p("  <name>%s</name>\n", esc(o.Name))
	p("  <metadata>\n    <remora:lab xmlns:remora='%s' ip='%s' mac='%s'/>\n  </metadata>\n", MetadataURI, esc(o.IP), esc(o.MAC))
	p("  <memory unit='MiB'>%d</memory>\n  <currentMemory unit='MiB'>%d</currentMemory>\n", o.MemoryMiB, o.MemoryMiB)
	p("  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>\n")
	p("  <vcpu placement='static'>1</vcpu>\n")
	p("  <os>\n    <type arch='x86_64' machine='%s'>hvm</type>\n", esc(o.Machine))
	p("    <kernel>%s</kernel>\n    <initrd>%s</initrd>\n    <cmdline>%s</cmdline>\n  </os>\n",
		esc(o.Kernel), esc(o.Initrd), esc(o.KernelCmdline()))
	p("  <features><acpi/><apic/></features>\n")
	p("  <clock offset='utc'/>\n")
	p("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n  <on_crash>destroy</on_crash>\n")
	p("  <devices>\n")
	p("    <controller type='usb' model='none'/>\n")
	if o.DataDisk != "" {
		p("    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n")
		p("      <source file='%s'/>\n      <target dev='%s' bus='virtio'/>\n    </disk>\n", esc(o.DataDisk), esc(o.DataDiskTarget))
	}
	p("    <interface type='bridge'>\n      <source bridge='%s'/>\n      <mac address='%s'/>\n      <model type='virtio'/>\n    </interface>\n",
		Bridge, esc(o.MAC))
	p("    <serial type='pty'>\n      <log file='%s' append='off'/>\n      <target port='0'/>\n    </serial>\n", esc(o.ConsoleLog))
	p("    <console type='pty'><target type='serial' port='0'/></console>\n")
	p("    <video><model type='none'/></video>\n")
	p("    <memballoon model='none'/>\n")
	p("  </devices>\n")
	if o.Incoming {
		p("  <qemu:commandline>\n    <qemu:arg value='-incoming'/>\n    <qemu:arg value='defer'/>\n  </qemu:commandline>\n")
	}
	p("</domain>\n")
	return b.String()
}

// Virsh runs virsh against LibvirtURI and returns its trimmed stdout.
func Virsh(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "virsh", append([]string{"-q", "-c", LibvirtURI}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(errb.String())
		if msg == "" {
			msg = err.Error()
		}
		return strings.TrimSpace(out.String()), fmt.Errorf("virsh %s: %s", strings.Join(args, " "), msg)
	}
	return strings.TrimSpace(out.String()), nil
}

// Guest is a lab guest started by Boot (or Start).
type Guest struct {
	Name       string
	IP         string
	MAC        string
	Options    GuestOptions // with defaults applied
	XML        string       // the XML it was defined with
	ConsoleLog string
	// BootTime is the time from `virsh start` until the workload answered.
	BootTime time.Duration
}

// Addr is the workload's address, IP:7000.
func (g *Guest) Addr() string { return net.JoinHostPort(g.IP, strconv.Itoa(GuestPort)) }

// Dial connects to the workload from the root namespace.
func (g *Guest) Dial(ctx context.Context) (*Client, error) { return DialContext(ctx, g.Addr()) }

// DialFrom connects to the workload from network namespace ns.
func (g *Guest) DialFrom(ctx context.Context, ns string) (*Client, error) {
	return DialNetns(ctx, ns, g.Addr())
}

// Destroy destroys and undefines the guest's domain.
func (g *Guest) Destroy() error { return Destroy(g.Name) }

// Console returns what the guest wrote to its serial console so far.
func (g *Guest) Console() string {
	b, _ := os.ReadFile(g.ConsoleLog)
	return string(b)
}

// State returns the domain state as virsh domstate prints it ("running",
// "paused", "shut off", ...).
func (g *Guest) State(ctx context.Context) (string, error) { return Virsh(ctx, "domstate", g.Name) }

// Machine returns the machine type libvirt resolved for the running domain
// (e.g. pc-i440fx-7.2): a standby copy should use exactly this one.
func (g *Guest) Machine(ctx context.Context) (string, error) {
	x, err := Virsh(ctx, "dumpxml", g.Name)
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(`<type arch='[^']*' machine='([^']+)'`).FindStringSubmatch(x)
	if m == nil {
		return "", fmt.Errorf("labkit: no machine type in the XML of %s", g.Name)
	}
	return m[1], nil
}

// PID returns the QEMU process id of the running domain.
func (g *Guest) PID() (int, error) { return DomainPID(g.Name) }

// RAMPath returns the guest RAM file of the running domain (see RAMPath).
func (g *Guest) RAMPath() (string, error) { return RAMPath(g.Name) }

// DomainPID returns the QEMU process id of a running domain, from libvirt's
// pid file.
func DomainPID(name string) (int, error) {
	b, err := os.ReadFile(filepath.Join("/run/libvirt/qemu", name+".pid"))
	if err != nil {
		return 0, fmt.Errorf("labkit: domain %s: %w", name, err)
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// QEMUUser returns the user the QEMU process of running domain name runs as.
func QEMUUser(name string) (string, error) {
	pid, err := DomainPID(name)
	if err != nil {
		return "", err
	}
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d", pid), &st); err != nil {
		return "", fmt.Errorf("labkit: domain %s: %w", name, err)
	}
	u, err := user.LookupId(strconv.Itoa(int(st.Uid)))
	if err != nil {
		return strconv.Itoa(int(st.Uid)), nil
	}
	return u.Username, nil
}

// RAMPath returns the file backing the main RAM of running domain name.
// libvirt creates it as MemoryBackingDir/libvirt/qemu/<id>-<name>/pc.ram
// (<name> shortened for long names; older libvirt: without libvirt/qemu);
// it is found by the domain id, or else among QEMU's open files.
func RAMPath(name string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	id, err := Virsh(ctx, "domid", name)
	if err != nil {
		return "", err
	}
	if _, err := strconv.Atoi(id); err != nil {
		return "", fmt.Errorf("labkit: domain %s is not running (id %q)", name, id)
	}
	for _, pat := range []string{
		filepath.Join(MemoryBackingDir, "libvirt", "qemu", id+"-*", "pc.ram"),
		filepath.Join(MemoryBackingDir, id+"-*", "pc.ram"),
	} {
		if m, _ := filepath.Glob(pat); len(m) == 1 {
			return m[0], nil
		}
	}
	pid, err := DomainPID(name)
	if err != nil {
		return "", err
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return "", fmt.Errorf("labkit: domain %s: %w", name, err)
	}
	for _, fd := range fds {
		t, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err == nil && strings.HasPrefix(t, MemoryBackingDir+"/") && filepath.Base(t) == "pc.ram" {
			return t, nil
		}
	}
	return "", fmt.Errorf("labkit: domain %s (id %s): no pc.ram under %s", name, id, MemoryBackingDir)
}

// Destroy destroys and undefines domain name. A domain that does not exist
// is not an error.
func Destroy(name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := Virsh(ctx, "domstate", name); err != nil {
		if strings.Contains(err.Error(), "failed to get domain") || strings.Contains(err.Error(), "Domain not found") {
			return nil
		}
		return err
	}
	if _, err := Virsh(ctx, "destroy", name); err != nil && !strings.Contains(err.Error(), "not running") {
		return err
	}
	if _, err := Virsh(ctx, "undefine", name); err != nil && !strings.Contains(err.Error(), "not found") &&
		!strings.Contains(err.Error(), "failed to get domain") {
		return err
	}
	return nil
}

// CheckLab returns nil if the lab is usable from this process: root,
// libvirt reachable, the guest image and the bridge present. The error
// says how to fix it.
func CheckLab(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("labkit: the lab needs root")
	}
	if _, err := exec.LookPath("virsh"); err != nil {
		return errors.New("labkit: virsh not found: run test/lab/lab.sh up")
	}
	if _, err := Virsh(ctx, "version"); err != nil {
		return fmt.Errorf("labkit: libvirt not reachable (run test/lab/lab.sh up): %w", err)
	}
	for _, f := range []string{KernelPath(), InitrdPath()} {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("labkit: guest image missing (run test/lab/lab.sh up): %w", err)
		}
	}
	if _, err := os.Stat("/sys/class/net/" + Bridge); err != nil {
		return fmt.Errorf("labkit: bridge %s missing: run test/lab/lab.sh up", Bridge)
	}
	return nil
}

// Define defines the domain for o (replacing a domain of the same name,
// which is destroyed first) without starting it.
func Define(ctx context.Context, o GuestOptions) (*Guest, error) {
	o, err := o.withDefaults()
	if err != nil {
		return nil, err
	}
	for _, f := range []string{o.Kernel, o.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("labkit: guest image missing (run test/lab/lab.sh up): %w", err)
		}
	}
	if err := Destroy(o.Name); err != nil {
		return nil, fmt.Errorf("labkit: removing old domain %s: %w", o.Name, err)
	}
	x := DomainXML(o)
	dir := filepath.Join(LabDir(), "domains")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(o.ConsoleLog), 0o755); err != nil {
		return nil, err
	}
	file := filepath.Join(dir, o.Name+".xml")
	if err := os.WriteFile(file, []byte(x), 0o644); err != nil {
		return nil, err
	}
	if _, err := Virsh(ctx, "define", file); err != nil {
		return nil, err
	}
	return &Guest{Name: o.Name, IP: o.IP, MAC: o.MAC, Options: o, XML: x, ConsoleLog: o.ConsoleLog}, nil
}

// Boot defines and starts a guest (destroying and undefining an old domain
// of the same name first) and waits until its workload answers on
// IP:7000. Under TCG that takes tens of seconds; the wait ends with ctx
// (if ctx has no deadline, after 3 minutes). On failure the domain is left
// as it is for inspection, and the error carries the end of the console.
func Boot(ctx context.Context, o GuestOptions) (*Guest, error) {
	if o.Incoming {
		return nil, errors.New("labkit: Boot of an Incoming (standby shell) domain: use Define and start it paused")
	}
	g, err := Define(ctx, o)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	if _, err := Virsh(ctx, "start", g.Name); err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 3*time.Minute)
		defer cancel()
	}
	if err := g.WaitReady(ctx); err != nil {
		return nil, err
	}
	g.BootTime = time.Since(start)
	return g, nil
}

// WaitReady polls until the workload answers "get", the domain stops
// running, or ctx ends.
func (g *Guest) WaitReady(ctx context.Context) error {
	var last error
	for i := 0; ; i++ {
		if i%4 == 0 {
			st, err := g.State(ctx)
			if err == nil && st != "running" {
				return fmt.Errorf("labkit: guest %s is %s, not running%s", g.Name, st, g.consoleTail())
			}
		}
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := DialContext(actx, g.Addr())
		if err == nil {
			_, err = c.Get(actx)
			c.Close()
		}
		cancel()
		if err == nil {
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("labkit: guest %s did not answer on %s (%v; last error: %v)%s",
				g.Name, g.Addr(), ctx.Err(), last, g.consoleTail())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func (g *Guest) consoleTail() string {
	s := strings.TrimSpace(g.Console())
	lines := strings.Split(s, "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return fmt.Sprintf("\nconsole (%s), last lines:\n%s", g.ConsoleLog, strings.Join(lines, "\n"))
}

// DefaultDataDiskTarget is the libvirt target dev of GuestOptions.DataDisk.
const DefaultDataDiskTarget = "vda"
