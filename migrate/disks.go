package migrate

import (
	"encoding/xml"
	"fmt"
	"regexp"
	"strings"
)

// WritableDisks lists the target devs (e.g. vda) of a domain's disks that
// the guest writes: device 'disk', neither read-only nor shared.
func WritableDisks(domainXML string) ([]string, error) {
	var d struct {
		Disks []struct {
			Device    string    `xml:"device,attr"`
			ReadOnly  *struct{} `xml:"readonly"`
			Shareable *struct{} `xml:"shareable"`
			Target    struct {
				Dev string `xml:"dev,attr"`
			} `xml:"target"`
		} `xml:"devices>disk"`
	}
	if err := xml.Unmarshal([]byte(domainXML), &d); err != nil {
		return nil, fmt.Errorf("parse domain XML: %w", err)
	}
	var devs []string
	for _, k := range d.Disks {
		if (k.Device == "" || k.Device == "disk") && k.ReadOnly == nil && k.Shareable == nil && k.Target.Dev != "" {
			devs = append(devs, k.Target.Dev)
		}
	}
	return devs, nil
}

var (
	reDiskBlock  = regexp.MustCompile(`(?s)<disk\s[^>]*>.*?</disk>`)
	reDiskTag    = regexp.MustCompile(`^<disk\s[^>]*>`)
	reDiskType   = regexp.MustCompile(`\stype=['"][^'"]*['"]`)
	reDiskSource = regexp.MustCompile(`(?s)<source\b[^>]*?(/>|>.*?</source>)`)
	reDriverType = regexp.MustCompile(`(<driver\b[^>]*\stype=)['"][^'"]*['"]`)
	reTargetDev  = regexp.MustCompile(`<target\s[^>]*dev=['"]([^'"]+)['"]`)
	reBackingEl  = regexp.MustCompile(`(?s)\s*<backingStore\b[^>]*?(/>|>.*?</backingStore>)`)
)

// ShellDisks points the shell's disks at the standby's replica images
// (raw files), by target dev; every writable disk must have one.
func ShellDisks(shellXML string, images map[string]string) (string, error) {
	done := map[string]bool{}
	var err error
	x := reDiskBlock.ReplaceAllStringFunc(shellXML, func(block string) string {
		m := reTargetDev.FindStringSubmatch(block)
		if m == nil {
			return block
		}
		img, ok := images[m[1]]
		if !ok {
			return block
		}
		if !reDiskSource.MatchString(block) {
			err = fmt.Errorf("disk %s has no <source>", m[1])
			return block
		}
		done[m[1]] = true
		b := reDiskTag.ReplaceAllStringFunc(block, func(tag string) string {
			return reDiskType.ReplaceAllString(tag, " type='file'")
		})
		b = reDiskSource.ReplaceAllLiteralString(b, "<source file='"+xmlEscape(img)+"'/>")
		b = reBackingEl.ReplaceAllString(b, "")
		if reDriverType.MatchString(b) {
			b = reDriverType.ReplaceAllString(b, "${1}'raw'")
		} else {
			b = strings.Replace(b, "<source ", "<driver name='qemu' type='raw'/>\n      <source ", 1)
		}
		return b
	})
	if err != nil {
		return "", err
	}
	for dev := range images {
		if !done[dev] {
			return "", fmt.Errorf("shell XML has no disk %s for its replica image", dev)
		}
	}
	return x, nil
}
