// Package safepath opens files beneath a root directory without following
// symbolic links on the way, so that a path built from names a peer sent
// never reaches outside the agent's own directories, whatever a local
// process placed there (openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS:
// Linux 5.6 and later).
package safepath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

const resolve = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// Open opens rel (relative, slash-separated) beneath root with flag and
// perm as os.OpenFile takes them.
func Open(root, rel string, flag int, perm os.FileMode) (*os.File, error) {
	if err := checkRel(rel); err != nil {
		return nil, err
	}
	dir, err := unix.Open(root, unix.O_DIRECTORY|unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: root, Err: err}
	}
	defer unix.Close(dir)
	fd, err := unix.Openat2(dir, rel, &unix.OpenHow{Flags: uint64(flag | unix.O_CLOEXEC), Mode: uint64(perm.Perm()), Resolve: resolve})
	if err != nil {
		return nil, explain(root, rel, err)
	}
	return os.NewFile(uintptr(fd), filepath.Join(root, rel)), nil
}

// MkdirAll creates the directories of rel beneath root and gives each of
// them perm (an upgrade may change what an older agent made), refusing a
// symbolic link anywhere on the way.
func MkdirAll(root, rel string, perm os.FileMode) error {
	if err := checkRel(rel); err != nil {
		return err
	}
	dir, err := unix.Open(root, unix.O_DIRECTORY|unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: root, Err: err}
	}
	done := ""
	for _, c := range strings.Split(rel, "/") {
		if err := unix.Mkdirat(dir, c, uint32(perm.Perm())); err != nil && !errors.Is(err, unix.EEXIST) {
			unix.Close(dir)
			return &os.PathError{Op: "mkdir", Path: filepath.Join(root, done, c), Err: err}
		}
		next, err := unix.Openat2(dir, c, &unix.OpenHow{Flags: unix.O_DIRECTORY | unix.O_PATH | unix.O_CLOEXEC, Resolve: resolve})
		unix.Close(dir)
		if err != nil {
			return explain(root, filepath.Join(done, c), err)
		}
		dir, done = next, filepath.Join(done, c)
		// Through the descriptor just opened without following links.
		if err := os.Chmod(fmt.Sprintf("/proc/self/fd/%d", dir), perm.Perm()); err != nil {
			unix.Close(dir)
			return &os.PathError{Op: "chmod", Path: filepath.Join(root, done), Err: err}
		}
	}
	unix.Close(dir)
	return nil
}

func checkRel(rel string) error {
	if rel == "" || filepath.IsAbs(rel) || filepath.Clean(rel) != rel || rel == ".." || strings.HasPrefix(rel, "../") {
		return fmt.Errorf("path %q is not a plain relative path", rel)
	}
	return nil
}

func explain(root, rel string, err error) error {
	p := filepath.Join(root, rel)
	switch {
	case errors.Is(err, unix.ELOOP):
		return fmt.Errorf("%s: a symbolic link on the way (refused: remora never follows links in its own directories): remove it", p)
	case errors.Is(err, unix.EXDEV):
		return fmt.Errorf("%s: resolves outside %s (refused)", p, root)
	}
	return &os.PathError{Op: "open", Path: p, Err: err}
}
