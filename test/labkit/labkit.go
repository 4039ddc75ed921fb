// Package labkit drives the remora lab built by test/lab/lab.sh: it defines
// and boots lab guests through virsh, talks to the guest workload
// (test/guest) over its line protocol, and reaches into the lab's network
// namespaces.
//
// It is pure Go (no cgo, no libvirt bindings): it shells out to virsh and ip.
// Everything except DomainXML, the client and the constants needs root and
// a lab set up by `test/lab/lab.sh up`.
//
// Guests are TCG guests (domain type='qemu') of machine type "pc" (i440fx;
// libvirt expands it to the newest pc-i440fx-X.Y of the installed QEMU, on
// Debian 12 pc-i440fx-7.2) with 256 MiB of RAM in a shared file under
// MemoryBackingDir. A standby copy of a guest must use the same machine type
// and memory: build it with DomainXML from the same GuestOptions (another
// Name, Incoming set), or from the expanded machine of the running primary
// (Guest.Machine).
package labkit

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
)

// Lab facts; test/lab/lab.sh uses the same values (`lab.sh env` prints them).
const (
	DefaultLabDir    = "/var/lib/remora-lab"
	LibvirtURI       = "qemu:///system"
	MemoryBackingDir = "/dev/shm/remora" // qemu.conf memory_backing_dir (tmpfs)
	AgentRunDir      = "/run/remora"     // where agents put unix sockets for QEMU

	Bridge    = "rmbr0"
	BridgeIP  = "10.77.0.1" // in the root namespace
	PrefixLen = 24

	NetnsA       = "rm-a" // host A (primary agent)
	IPA          = "10.77.0.2"
	NetnsB       = "rm-b" // host B (standby agent)
	IPB          = "10.77.0.3"
	NetnsArbiter = "rm-arb"
	IPArbiter    = "10.77.0.4"
	NetnsClient  = "rm-client"
	IPClient     = "10.77.0.5"
	// NetnsIface is the name of the veth end inside each namespace; the
	// host end is "rmv-" + the namespace name without "rm-".
	NetnsIface = "eth0"

	// GuestIPFirst is GuestIP(0); guests get consecutive addresses.
	GuestIPFirst = "10.77.0.10"
	GuestPort    = 7000

	DefaultMachine     = "pc"
	DefaultMemoryMiB   = 256
	DefaultRegionPages = 8192
	DefaultRate        = 2000

	// MetadataURI marks lab domains (lab.sh down removes every domain that
	// has metadata under this URI).
	MetadataURI = "https://github.com/remora-ha/remora/lab"
)

// Namespaces lists the lab's network namespaces.
var Namespaces = []string{NetnsA, NetnsB, NetnsArbiter, NetnsClient}

// LabDir is $REMORA_LAB_DIR, or DefaultLabDir.
func LabDir() string {
	if d := os.Getenv("REMORA_LAB_DIR"); d != "" {
		return d
	}
	return DefaultLabDir
}

// KernelPath and InitrdPath are the guest image built by lab.sh up.
func KernelPath() string { return filepath.Join(LabDir(), "vmlinuz") }
func InitrdPath() string { return filepath.Join(LabDir(), "initramfs.img") }

// ConsoleLogPath is where a guest's serial console (ttyS0) is logged.
func ConsoleLogPath(name string) string { return filepath.Join(LabDir(), "console", name+".log") }

// GuestIP returns the address of lab guest i (0 -> 10.77.0.10).
func GuestIP(i int) string {
	if i < 0 || i > 244 {
		panic(fmt.Sprintf("labkit: guest index %d out of range [0,244]", i))
	}
	return fmt.Sprintf("10.77.0.%d", 10+i)
}

// GuestMAC is the deterministic MAC of the guest with the given IPv4 address:
// 52:54:00 followed by the last three bytes of the address. It derives from
// the address, not the domain name, so a guest's standby copy (another
// domain name) has the same MAC.
func GuestMAC(ip string) string {
	a := net.ParseIP(ip).To4()
	if a == nil {
		return ""
	}
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", a[1], a[2], a[3])
}
