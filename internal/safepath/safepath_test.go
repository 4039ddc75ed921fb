package safepath

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestOpenBeneath(t *testing.T) {
	root, outside := t.TempDir(), t.TempDir()
	if err := MkdirAll(root, "images/web1", 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := Open(root, "images/web1/vda.img", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if fi, err := os.Stat(filepath.Join(root, "images/web1/vda.img")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("created file: %v %v", fi, err)
	}
	// A link planted by a local process, as a directory and as the file.
	if err := os.Symlink(outside, filepath.Join(root, "images", "evil")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "x.img"), filepath.Join(root, "images/web1/vdb.img")); err != nil {
		t.Fatal(err)
	}
	for _, rel := range []string{"images/evil/vda.img", "images/web1/vdb.img"} {
		if _, err := Open(root, rel, os.O_RDWR|os.O_CREATE, 0o600); err == nil || !strings.Contains(err.Error(), "symbolic link") {
			t.Errorf("%s: %v", rel, err)
		}
	}
	if err := MkdirAll(root, "images/evil/sub", 0o700); err == nil {
		t.Error("MkdirAll through a link")
	}
	for _, rel := range []string{"../x", "/etc/passwd", "images/../../x", ""} {
		if _, err := Open(root, rel, os.O_RDONLY, 0); err == nil {
			t.Errorf("%q opened", rel)
		}
	}
	// Negative control: the plain os calls do follow the links.
	f, err = os.OpenFile(filepath.Join(root, "images/web1/vdb.img"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := os.Stat(filepath.Join(outside, "x.img")); err != nil {
		t.Fatal("the control did not reach outside: the test proves nothing")
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 1 {
		t.Fatalf("outside holds %v", ents)
	}
}

func TestMkdirAllSetsThePermOfWhatExists(t *testing.T) {
	root := t.TempDir()
	if err := os.Mkdir(filepath.Join(root, "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := MkdirAll(root, "images/g", 0o711); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"images", "images/g"} {
		fi, err := os.Stat(filepath.Join(root, d))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o711 {
			t.Fatalf("%s: mode %04o, want 0711", d, fi.Mode().Perm())
		}
	}
	if err := os.Symlink(t.TempDir(), filepath.Join(root, "images", "link")); err != nil {
		t.Fatal(err)
	}
	if err := MkdirAll(root, "images/link/x", 0o711); err == nil {
		t.Fatal("followed a symbolic link")
	}
}
