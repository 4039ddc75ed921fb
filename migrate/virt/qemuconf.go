package virt

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// QEMUConfPath is where libvirt's system daemon reads its QEMU settings.
const QEMUConfPath = "/etc/libvirt/qemu.conf"

// MemoryBackingHowTo is the one qemu.conf change remora needs.
const MemoryBackingHowTo = `set memory_backing_dir = "/dev/shm/remora" (any tmpfs or hugetlbfs directory) in ` + QEMUConfPath + ` and restart libvirtd`

// QEMUConf is what remora needs to know of libvirt's qemu.conf: who QEMU
// runs as and where guest RAM files live.
type QEMUConf struct {
	User             string // "libvirt-qemu" unless set (Debian's default)
	UID, GID         int
	MemoryBackingDir string
	// SecurityDriver as set ("" unset: libvirt picks AppArmor where the
	// kernel has it on); a list is kept as written.
	SecurityDriver string
}

// Debian builds libvirt with these defaults.
const (
	defaultQEMUUser         = "libvirt-qemu"
	defaultMemoryBackingDir = "/var/lib/libvirt/qemu/ram"
)

// ReadQEMUConf reads path (QEMUConfPath), applying libvirt's defaults for
// what it leaves out.
func ReadQEMUConf(path string) (QEMUConf, error) {
	c := QEMUConf{User: defaultQEMUUser, MemoryBackingDir: defaultMemoryBackingDir}
	f, err := os.Open(path)
	if err != nil {
		return c, fmt.Errorf("read libvirt's QEMU settings: %w", err)
	}
	defer f.Close()
	group := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			continue // a list spanning lines; none of ours
		}
		key, val = strings.TrimSpace(key), strings.TrimSpace(val)
		if key != "user" && key != "group" && key != "memory_backing_dir" && key != "security_driver" {
			continue
		}
		if key == "security_driver" && strings.HasPrefix(val, "[") {
			c.SecurityDriver = val
			continue
		}
		s, err := strconv.Unquote(val)
		if err != nil {
			return c, fmt.Errorf("%s line %d: %s must be a quoted string, not %s", path, n, key, val)
		}
		switch key {
		case "user":
			c.User = s
		case "group":
			group = s
		case "memory_backing_dir":
			c.MemoryBackingDir = s
		case "security_driver":
			c.SecurityDriver = s
		}
	}
	if err := sc.Err(); err != nil {
		return c, fmt.Errorf("read %s: %w", path, err)
	}
	if c.UID, c.GID, err = lookupIDs(c.User, group); err != nil {
		return c, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// lookupIDs resolves qemu.conf's user and group ("+N" is a numeric id).
func lookupIDs(name, group string) (uid, gid int, err error) {
	if id, ok := strings.CutPrefix(name, "+"); ok {
		if uid, err = strconv.Atoi(id); err != nil {
			return 0, 0, fmt.Errorf("user %q: not a number", name)
		}
	} else {
		u, err := user.Lookup(name)
		if err != nil {
			return 0, 0, fmt.Errorf("QEMU's user %q: %w", name, err)
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
	}
	switch {
	case group == "":
	case strings.HasPrefix(group, "+"):
		if gid, err = strconv.Atoi(group[1:]); err != nil {
			return 0, 0, fmt.Errorf("group %q: not a number", group)
		}
	default:
		g, err := user.LookupGroup(group)
		if err != nil {
			return 0, 0, fmt.Errorf("QEMU's group %q: %w", group, err)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}
	return uid, gid, nil
}

// CheckMemoryBackingDir explains what to change when guest RAM files would
// not be on tmpfs or hugetlbfs, where the agent maps them without the
// kernel writing them back to a disk.
func (c QEMUConf) CheckMemoryBackingDir() error {
	dir := c.MemoryBackingDir
	for { // libvirt creates it at the first guest start
		if _, err := os.Stat(dir); err == nil || dir == "/" {
			break
		}
		dir = filepath.Dir(dir)
	}
	if err := CheckRAMFilesystem(dir); err != nil {
		return fmt.Errorf("memory_backing_dir %s: %w; %s", c.MemoryBackingDir, err, MemoryBackingHowTo)
	}
	return nil
}

// CheckRAMFilesystem refuses a path that is not on tmpfs or hugetlbfs.
func CheckRAMFilesystem(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("statfs: %w", err)
	}
	switch int64(st.Type) {
	case unix.TMPFS_MAGIC, unix.HUGETLBFS_MAGIC:
		return nil
	}
	return fmt.Errorf("on a disk filesystem (type %#x), not tmpfs or hugetlbfs: every dirtied page would be written back to disk", st.Type)
}

// CheckReachable explains what to change when QEMU, running as c.User,
// cannot reach path: each directory on the way must be searchable by it.
// what says what QEMU needs there, e.g. "the agent's sockets".
func (c QEMUConf) CheckReachable(path, what string) error {
	if c.UID == 0 {
		return nil
	}
	p, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	var closed []string // outermost first
	for d := p; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if err == nil && !c.searchable(fi) {
			closed = append([]string{fmt.Sprintf("%s (mode %04o)", d, fi.Mode().Perm())}, closed...)
		}
		if d == "/" {
			break
		}
	}
	if len(closed) == 0 {
		return nil
	}
	dirs := make([]string, len(closed))
	for i, c := range closed {
		dirs[i], _, _ = strings.Cut(c, " (")
	}
	return fmt.Errorf("%s: QEMU runs as %s (qemu.conf) and must reach %s there, but cannot search %s: chmod o+x %s, or choose a directory QEMU can reach",
		path, c.User, what, strings.Join(closed, ", "), strings.Join(dirs, " "))
}

func (c QEMUConf) searchable(fi fs.FileInfo) bool {
	m := fi.Mode().Perm()
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case m&0o001 != 0:
		return true
	case ok && int(st.Uid) == c.UID:
		return m&0o100 != 0
	case ok && int(st.Gid) == c.GID:
		return m&0o010 != 0
	}
	return false
}
