// Package names is the one validator of the names remora reads from the
// wire, an API or a config: agent ids (certificate names), guest (domain)
// names and disk device names. A valid name is one path component that
// never reaches outside the directory it is joined to.
package names

import (
	"fmt"
	"regexp"
)

var (
	agentRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)
	guestRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	devRE   = regexp.MustCompile(`^[a-z][a-z0-9]{0,15}$`)
)

// The rules, for error messages.
const (
	AgentRule = `an agent name is 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit, and not "ca"`
	GuestRule = `a guest name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit`
	DevRule   = `a disk device name is 1-16 lower-case letters and digits, starting with a letter (vda, sdb, nvme0n1)`
)

// ValidAgent reports whether name can be an agent id, the arbiter's name
// or any certificate name.
func ValidAgent(name string) bool { return agentRE.MatchString(name) && name != "ca" }

// ValidGuest reports whether name can be a protected guest's name.
func ValidGuest(name string) bool { return guestRE.MatchString(name) }

// ValidDev reports whether dev can be a disk's target device.
func ValidDev(dev string) bool { return devRE.MatchString(dev) }

// Agent, Guest and Dev return an error naming what and the rule when the
// name is not valid.
func Agent(what, name string) error { return check(what, name, ValidAgent(name), AgentRule) }
func Guest(what, name string) error { return check(what, name, ValidGuest(name), GuestRule) }
func Dev(what, name string) error   { return check(what, name, ValidDev(name), DevRule) }

func check(what, name string, ok bool, rule string) error {
	if ok {
		return nil
	}
	if len(name) > 80 {
		name = name[:80] + "..."
	}
	return fmt.Errorf("%s %q is not a valid name: %s", what, name, rule)
}
