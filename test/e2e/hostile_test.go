package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/pki"
	"github.com/remora-ha/remora/test/labkit"
)

// TestHostilePeers runs a real standby agent (mutual TLS, a real guest
// replicated from its real primary) against a test client that speaks the
// replication protocol with hostile intent: every attempt gets a clear
// refusal, and afterwards nothing outside the agent's expected state
// changed on disk, no domain was created or destroyed, and the agent's
// goroutines are back to their baseline.
func TestHostilePeers(t *testing.T) {
	needLab(t)
	if err := pki.Issue(labPKI, "mallory"); err != nil { // an agent of the same CA
		t.Fatal(err)
	}
	a := newHost(t, "host-a", labkit.NetnsA, labkit.IPA, hostOpts{})
	b := newHost(t, "host-b", labkit.NetnsB, labkit.IPB, hostOpts{extra: "max_replicas: 2\n"})
	a.start()
	b.start()
	// A data disk: its NBD relay is one of the sockets a local process tries.
	img := filepath.Join(labkit.QEMUTempDir(t), "data.img")
	if err := labkit.CreateDataDisk(img, 32<<20); err != nil {
		t.Fatal(err)
	}
	g := bootGuestWith(t, labkit.GuestOptions{Name: "e2e-hostile", IP: labkit.GuestIP(31), Rate: 500, DataDisk: img})
	if out, err := a.cli("vm", "enroll", g.Name, "--standby", b.addr, "--timeout", "3m"); err != nil || !strings.Contains(out, "protected") {
		t.Fatalf("enroll: %v\n%s", err, out)
	}
	waitFor(t, "the data disk mirrored", 2*time.Minute, func() bool {
		s, ok := a.status(g.Name)
		return ok && s.Disk != nil && s.Disk.State == "mirrored"
	})
	st, _ := b.status(g.Name)
	replicaFence := st.Fence

	ctx := context.Background()
	baseInfo, err := b.client().Agent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	domsBefore := domainNames(t)
	filesBefore := tree(t, b.dir)
	tmpBefore := tree(t, os.TempDir())
	outside := filepath.Join(os.TempDir(), "remora-hostile-"+fmt.Sprint(time.Now().UnixNano()))

	hello := func(agent, guest string) checkpoint.Hello {
		return checkpoint.Hello{Agent: agent, Guest: guest, Generation: "hostile", RAMBytes: 128 << 20, PageSize: checkpoint.PageSize,
			DomainXML: labkit.DomainXML(labkit.GuestOptions{Name: guest, IP: labkit.GuestIP(32)})}
	}
	withXML := func(guest, devices string) checkpoint.Hello {
		h := hello("mallory", guest)
		h.DomainXML = strings.Replace(h.DomainXML, "</devices>", devices+"</devices>", 1)
		return h
	}
	qemuCmdline := withXML("hostile-cmdline", "")
	qemuCmdline.DomainXML = strings.Replace(strings.Replace(qemuCmdline.DomainXML, "<domain ", "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' ", 1),
		"</domain>", "<qemu:commandline><qemu:arg value='-snapshot'/></qemu:commandline></domain>", 1)

	cases := []struct {
		name    string
		cert    string
		kind    checkpoint.FrameType
		fence   uint64
		payload any
		want    string
	}{
		{"path traversal in the guest name", "mallory", checkpoint.FrameHello, 1,
			checkpoint.Hello{Agent: "mallory", Guest: "../../../.." + outside + "/x", PageSize: checkpoint.PageSize, RAMBytes: 4096,
				Disks: []checkpoint.DiskSpec{{Dev: "vda", Size: 4096}}}, "is not a valid name"},
		{"path traversal in a disk name", "mallory", checkpoint.FrameHello, 1,
			checkpoint.Hello{Agent: "mallory", Guest: "hostile-disk", PageSize: checkpoint.PageSize, RAMBytes: 4096,
				Disks: []checkpoint.DiskSpec{{Dev: "../../../../etc/x", Size: 4096}}}, "is not a valid name"},
		{"another agent's certificate claiming host-a", "mallory", checkpoint.FrameHello, replicaFence, hello("host-a", g.Name), "claims to be agent \"host-a\""},
		{"a second primary for the guest", "mallory", checkpoint.FrameHello, replicaFence, hello("mallory", g.Name), "belongs to primary host-a"},
		{"fence 2^64-1 from a second primary", "mallory", checkpoint.FrameHello, math.MaxUint64, hello("mallory", g.Name), "belongs to primary host-a"},
		{"unenroll from a second primary", "mallory", checkpoint.FrameUnenroll, math.MaxUint64, checkpoint.Hello{Agent: "mallory", Guest: g.Name}, "may not unenroll"},
		{"NBD connection from a non-primary", "mallory", checkpoint.FrameDiskNBD, math.MaxUint64, checkpoint.DiskHello{Agent: "mallory", Guest: g.Name, Dev: "vda"}, "may not open"},
		{"disk reset from a non-primary", "mallory", checkpoint.FrameDiskControl, math.MaxUint64, checkpoint.DiskHello{Agent: "mallory", Guest: g.Name, Dev: "vda", Reset: true}, "may not open"},
		{"restart notice from a non-primary", "mallory", checkpoint.FrameRestarting, math.MaxUint64, checkpoint.Restarting{Agent: "mallory", Guest: g.Name, Grace: time.Hour}, "is not guest"},
		{"qemu:commandline in the domain XML", "mallory", checkpoint.FrameHello, 1, qemuCmdline, "commandline"},
		{"a host device in the domain XML", "mallory", checkpoint.FrameHello, 1,
			withXML("hostile-hostdev", "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/></source></hostdev>"), "hostdev"},
		{"a host block device as a disk", "mallory", checkpoint.FrameHello, 1,
			withXML("hostile-block", "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sda'/><target dev='vdz' bus='virtio'/></disk>"), "block"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			msg := refusal(t, b, c.cert, c.kind, c.fence, c.payload)
			if !strings.Contains(msg, c.want) {
				t.Fatalf("refusal %q does not say %q", msg, c.want)
			}
		})
	}

	t.Run("a flood of new guest names", func(t *testing.T) {
		for i := range 40 {
			h := withXML(fmt.Sprintf("hostile-flood-%d", i), "<hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0x5678'/></source></hostdev>")
			if msg := refusal(t, b, "mallory", checkpoint.FrameHello, 1, h); msg == "" {
				t.Fatal("accepted")
			}
		}
		sts, err := b.client().Status(ctx)
		if err != nil || len(sts) != 1 {
			t.Fatalf("after the flood the standby lists %d guests (%v), want only %s", len(sts), err, g.Name)
		}
	})

	t.Run("an oversized frame before the handshake", func(t *testing.T) {
		conn, err := dialAgentAs(ctx, labkit.NetnsA, b.addr, labPKI, "mallory")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		hdr := checkpoint.AppendFrame(nil, checkpoint.Frame{Type: checkpoint.FrameHello, Payload: make([]byte, checkpoint.MaxFramePayload)})
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := conn.Write(hdr[:64]); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadAll(conn); err != nil {
			t.Fatalf("the standby did not close at once: %v", err)
		}
	})

	t.Run("a certificate of another CA", func(t *testing.T) {
		other := t.TempDir()
		if err := pki.InitCA(other, false); err != nil {
			t.Fatal(err)
		}
		if err := pki.Issue(other, "host-a"); err != nil {
			t.Fatal(err)
		}
		if c, err := dialAgentAs(ctx, labkit.NetnsA, b.addr, other, "host-a"); err == nil {
			// TLS 1.3 reports the server's refusal of a client
			// certificate on the first read.
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			_, err = c.Read(make([]byte, 1))
			c.Close()
			if err == nil || !strings.Contains(err.Error(), "certificate") {
				t.Fatalf("a foreign CA's certificate: %v", err)
			}
		}
	})

	t.Run("a local process on the primary's QEMU sockets", func(t *testing.T) {
		// The NBD relay would carry this process's writes into the
		// replica, the device-state socket its bytes into a checkpoint:
		// both must close it before reading or relaying anything.
		socks, _ := filepath.Glob(filepath.Join(a.dir, "run", "disk", "*.nbd.sock"))
		dev, _ := filepath.Glob(filepath.Join(a.dir, "run", "*.devstate.sock"))
		socks = append(socks, dev...)
		if len(socks) < 2 {
			t.Fatalf("the primary's QEMU sockets: %v", socks)
		}
		before, _ := b.status(g.Name)
		for _, p := range socks {
			c, err := net.Dial("unix", p)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			if strings.HasSuffix(p, ".devstate.sock") {
				_, _ = c.Write([]byte("QEVM garbage device state"))
			} // on the relay, wait for the standby's NBD greeting
			_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
			n, err := io.Copy(io.Discard, c)
			c.Close()
			if n != 0 || (err != nil && !errors.Is(err, syscall.ECONNRESET)) { // reset: closed with our bytes unread
				t.Fatalf("%s answered a process other than QEMU: %d bytes, %v", filepath.Base(p), n, err)
			}
		}
		waitFor(t, "checkpoints to go on", 30*time.Second, func() bool {
			s, ok := b.status(g.Name)
			return ok && s.Epoch > before.Epoch+5
		})
	})

	t.Run("the admin socket from an unprivileged user", func(t *testing.T) {
		// The socket's own mode and the agent's peer check must be the
		// gate, not the test's private directories: open the way to it,
		// and run a copy of the CLI that anyone may execute.
		for _, d := range []string{filepath.Dir(b.dir), b.dir} {
			if err := os.Chmod(d, 0o711); err != nil {
				t.Fatal(err)
			}
		}
		binDir, err := os.MkdirTemp("", "remora-cli-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(binDir) })
		if err := os.Chmod(binDir, 0o755); err != nil {
			t.Fatal(err)
		}
		cli := filepath.Join(binDir, "remora")
		if out, err := exec.Command("cp", remoraBin, cli).CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		run := func(uid uint32) (string, error) {
			cmd := exec.Command(cli, "vm", "status", "--socket", filepath.Join(b.dir, "agent.sock"))
			if uid != 0 {
				cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
			}
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		if out, err := run(0); err != nil || !strings.Contains(out, g.Name) {
			t.Fatalf("control: root cannot use the admin socket: %v\n%s", err, out)
		}
		out, err := run(65534)
		if err == nil || strings.Contains(out, g.Name) || strings.Contains(out, "fork/exec") {
			t.Fatalf("nobody read the admin API:\n%s", out)
		}
		t.Logf("nobody: %v: %s", err, strings.TrimSpace(out))
		// An admin's chmod must not open the API: the agent checks the
		// peer's credentials as well.
		sock := filepath.Join(b.dir, "agent.sock")
		if err := os.Chmod(sock, 0o666); err != nil {
			t.Fatal(err)
		}
		defer os.Chmod(sock, 0o600)
		out, err = run(65534)
		if err == nil || !strings.Contains(out, "may not use this agent's admin socket") {
			t.Fatalf("nobody through a 0666 admin socket: %v\n%s", err, out)
		}
		t.Logf("nobody through a 0666 socket: %s", strings.TrimSpace(out))
	})

	// Afterwards: the replica goes on, nothing changed outside the
	// agent's own state, no domain came or went, no goroutine leaked.
	if s, ok := b.status(g.Name); !ok || s.Fence != replicaFence || s.State != "protected" {
		t.Errorf("the real replica after the suite: %+v", s)
	}
	if s, ok := a.status(g.Name); !ok || s.State != checkpoint.StateProtected {
		t.Errorf("the real primary after the suite: %+v", s)
	}
	if _, err := os.Stat(outside); err == nil {
		t.Errorf("%s was created outside the agent's directories", outside)
	}
	if d := domainNames(t); !slices.Equal(d, domsBefore) {
		t.Errorf("domains changed: before %v, after %v", domsBefore, d)
	}
	if added, removed := diffTree(filesBefore, tree(t, b.dir)); len(added)+len(removed) > 0 {
		t.Errorf("the standby's directories changed: added %v, removed %v", added, removed)
	}
	if added, _ := diffTree(tmpBefore, tree(t, os.TempDir())); slices.ContainsFunc(added, func(p string) bool { return strings.Contains(p, "remora-hostile") || strings.Contains(p, "hostile-") }) {
		t.Errorf("files appeared in %s: %v", os.TempDir(), added)
	}
	var info api.AgentInfo
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		info, err = b.client().Agent(ctx)
		if err == nil && info.Goroutines <= baseInfo.Goroutines+3 {
			break
		}
		if time.Now().After(deadline) {
			b.stop(syscall.SIGQUIT) // its goroutines, for the saved log
			t.Fatalf("the agent's goroutines did not come back to their baseline of %d: %d (%v)", baseInfo.Goroutines, info.Goroutines, err)
		}
	}
	t.Logf("goroutines %d -> %d, heap %d -> %d KiB, replicas %d", baseInfo.Goroutines, info.Goroutines, baseInfo.HeapBytes>>10, info.HeapBytes>>10, info.Replicas)
}

// refusal opens a connection of kind to b as certificate name, sends
// payload and returns the error the agent answers with (failing the test
// when it answers anything else).
func refusal(t *testing.T, b *host, cert string, kind checkpoint.FrameType, fence uint64, payload any) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := dialAgentAs(ctx, labkit.NetnsA, b.addr, labPKI, cert)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if err := checkpoint.WriteJSON(conn, kind, fence, 0, payload); err != nil {
		t.Fatal(err)
	}
	f, err := checkpoint.ReadFrame(bufio.NewReader(conn))
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	var msg checkpoint.ErrorMsg
	if f.Type != checkpoint.FrameError || json.Unmarshal(f.Payload, &msg) != nil || msg.Error == "" {
		t.Fatalf("answered %s %q, want a refusal", f.Type, f.Payload)
	}
	t.Logf("refused: %s", msg.Error)
	return msg.Error
}

func domainNames(t *testing.T) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := labkit.Virsh(ctx, "list", "--all", "--name")
	if err != nil {
		t.Fatal(err)
	}
	names := strings.Fields(out)
	slices.Sort(names)
	return names
}

// tree lists the paths under root (files and directories, not their
// contents: journals and records are rewritten as they go).
func tree(t *testing.T, root string) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() && p != root && strings.HasPrefix(filepath.Base(p), "go-build") {
			return filepath.SkipDir
		}
		out[p] = true
		return nil
	})
	return out
}

func diffTree(before, after map[string]bool) (added, removed []string) {
	for p := range after {
		if !before[p] && !transient(p) {
			added = append(added, p)
		}
	}
	for p := range before {
		if !after[p] && !transient(p) {
			removed = append(removed, p)
		}
	}
	slices.Sort(added)
	slices.Sort(removed)
	return added, removed
}

// transient paths come and go in normal replication (staged epochs,
// atomic-write temporaries, journal segments).
func transient(p string) bool {
	return strings.Contains(p, "/staged") || strings.HasPrefix(filepath.Base(p), "stage.") || strings.HasPrefix(filepath.Base(p), "commit-") || strings.HasSuffix(p, ".tmp") || strings.Contains(p, ".tmp-") ||
		strings.Contains(p, "/journal/") || strings.Contains(p, "/epochs/")
}
