package virt

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// AppArmorFiles are where the kernel says whether AppArmor is on and where
// libvirt's QEMU profile takes a site's additions from.
type AppArmorFiles struct {
	Enabled      string // "Y" when the kernel enforces AppArmor
	Local        string // the site's additions to libvirt's QEMU abstraction
	Abstractions string // where `include <abstractions/NAME>` looks
}

// DefaultAppArmor is Debian's layout.
var DefaultAppArmor = AppArmorFiles{
	Enabled:      "/sys/module/apparmor/parameters/enabled",
	Local:        "/etc/apparmor.d/local/abstractions/libvirt-qemu",
	Abstractions: "/etc/apparmor.d/abstractions",
}

var aaInclude = regexp.MustCompile(`^#?include(?:\s+if\s+exists)?\s+<abstractions/([^>]+)>`)

// CheckAppArmorReach explains what to add when libvirt confines QEMU with
// AppArmor and its profile does not let QEMU reach dir, where the agent
// keeps the sockets QEMU connects to (libvirt's per-guest rules cover only
// what the domain's XML names).
func (c QEMUConf) CheckAppArmorReach(f AppArmorFiles, dir, what string) error {
	if b, err := os.ReadFile(f.Enabled); err != nil || strings.TrimSpace(string(b)) != "Y" {
		return nil // no AppArmor here
	}
	if c.SecurityDriver != "" && !strings.Contains(c.SecurityDriver, "apparmor") {
		return nil // libvirt confines QEMU otherwise, or not at all
	}
	dir = filepath.Clean(dir)
	rules := readRules(f.Local)
	for _, line := range rules {
		if m := aaInclude.FindStringSubmatch(line); m != nil {
			rules = append(rules, readRules(filepath.Join(f.Abstractions, m[1]))...)
		}
	}
	for _, line := range rules {
		path, perms, ok := strings.Cut(strings.TrimSuffix(line, ","), " ")
		if ok && strings.Trim(path, `"`) == dir+"/**" && strings.Contains(perms, "w") {
			return nil
		}
	}
	return fmt.Errorf("%s: AppArmor confines QEMU here and libvirt's profile for it does not let it reach %s: "+
		"add `include if exists <abstractions/remora-qemu>` to %s (remora's package does; the file is in configs/apparmor), "+
		"or, for this runtime_dir, the lines `%s/ r,` and `%s/** rwk,`", dir, what, f.Local, dir, dir)
}

// readRules is the file's lines, trimmed, without blanks and comments
// (but with #include lines, the old include syntax).
func readRules(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || (strings.HasPrefix(line, "#") && !strings.HasPrefix(line, "#include")) {
			continue
		}
		out = append(out, line)
	}
	return out
}
