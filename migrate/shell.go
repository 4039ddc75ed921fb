package migrate

import (
	"fmt"
	"regexp"
	"strings"
)

const qemuNS = "http://libvirt.org/schemas/domain/qemu/1.0"

var (
	reName     = regexp.MustCompile(`<name>[^<]*</name>`)
	reUUID     = regexp.MustCompile(`\s*<uuid>[^<]*</uuid>`)
	reDomTag   = regexp.MustCompile(`<domain\s[^>]*>`)
	reLogPaths = regexp.MustCompile(`((?:<source|<log)\s[^>]*(?:path|file)=['"])([^'"]+)(['"])`)
	reTapDev   = regexp.MustCompile(`\s*<target dev=['"]vnet[0-9]+['"]\s*/>`)
)

// ShellXML derives the standby shell domain from the primary's migratable
// XML: same machine type and devices, a new name and identity, started
// waiting for an incoming migration that the agent feeds at failover.
func ShellXML(primaryXML, shellName string) (string, error) {
	if !reDomTag.MatchString(primaryXML) || !reName.MatchString(primaryXML) {
		return "", fmt.Errorf("primary domain XML has no <domain> or <name>: cannot derive the standby shell")
	}
	if err := CheckSharedMemoryXML(shellName, primaryXML); err != nil {
		return "", err
	}
	x := reName.ReplaceAllLiteralString(primaryXML, "<name>"+xmlEscape(shellName)+"</name>")
	x = reUUID.ReplaceAllString(x, "")
	x = reTapDev.ReplaceAllString(x, "")
	// Console logs would otherwise be shared with the primary's on one host.
	x = reLogPaths.ReplaceAllStringFunc(x, func(m string) string {
		parts := reLogPaths.FindStringSubmatch(m)
		if !strings.HasPrefix(parts[2], "/") || strings.HasPrefix(parts[2], "/dev/") {
			return m
		}
		return parts[1] + parts[2] + "." + shellName + parts[3]
	})
	if !strings.Contains(x, "xmlns:qemu=") {
		x = reDomTag.ReplaceAllStringFunc(x, func(tag string) string {
			return strings.TrimSuffix(tag, ">") + " xmlns:qemu='" + qemuNS + "'>"
		})
	}
	args := "  <qemu:commandline>\n    <qemu:arg value='-incoming'/>\n    <qemu:arg value='defer'/>\n  </qemu:commandline>\n"
	i := strings.LastIndex(x, "</domain>")
	if i < 0 {
		return "", fmt.Errorf("primary domain XML has no </domain>")
	}
	return x[:i] + args + x[i:], nil
}

func xmlEscape(s string) string {
	r := strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", "'", "&apos;", `"`, "&quot;")
	return r.Replace(s)
}
