package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/test/labkit"
)

// TestClearErrors checks that the mistakes an admin makes get an error that
// says what to do, and that nothing is left enrolled.
func TestClearErrors(t *testing.T) {
	needLab(t)
	a := newHost(t, "host-a", labkit.NetnsA, labkit.IPA, hostOpts{})
	b := newHost(t, "host-b", labkit.NetnsB, labkit.IPB, hostOpts{})
	a.start()
	b.start()

	t.Run("unknown domain", func(t *testing.T) {
		out, err := a.cli("vm", "enroll", "no-such-domain", "--standby", b.addr)
		if err == nil || !strings.Contains(out, `unknown domain "no-such-domain"`) || !strings.Contains(out, "virsh") {
			t.Fatalf("err=%v out=%s", err, out)
		}
	})

	t.Run("no shared memory backing", func(t *testing.T) {
		name := "e2e-noshm"
		x := labkit.DomainXML(labkit.GuestOptions{Name: name, IP: labkit.GuestIP(19)})
		x = strings.Replace(x, "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>", "", 1)
		file := filepath.Join(t.TempDir(), name+".xml")
		if err := os.WriteFile(file, []byte(x), 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = labkit.Destroy(name)
		if _, err := labkit.Virsh(ctx, "define", file); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = labkit.Destroy(name) })
		out, err := a.cli("vm", "enroll", name, "--standby", b.addr)
		if err == nil || !strings.Contains(out, "<access mode='shared'/>") || !strings.Contains(out, "memory_backing_dir") {
			t.Fatalf("err=%v out=%s", err, out)
		}
		if s, ok := a.status(name); ok {
			t.Fatalf("a refused guest is listed: %+v", s)
		}
	})

	t.Run("unknown config key", func(t *testing.T) {
		cfg := filepath.Join(t.TempDir(), "bad.yaml")
		if err := os.WriteFile(cfg, []byte("agent_id: x\nepoch_intervall: 50ms\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(remoraBin, "--config", cfg, "agent").CombinedOutput()
		if err == nil || !strings.Contains(string(out), `unknown key "epoch_intervall"`) {
			t.Fatalf("err=%v out=%s", err, out)
		}
	})

	t.Run("runtime_dir QEMU cannot reach", func(t *testing.T) {
		// Debian's QEMU runs as libvirt-qemu: a 0700 directory on the way
		// to the agent's sockets would fail at the first enroll.
		top := t.TempDir() // 0700, as Go makes it
		cfg := filepath.Join(top, "agent.yaml")
		text := fmt.Sprintf("agent_id: x\nlisten: 127.0.0.1:0\ninsecure_plaintext: true\napi_socket: %s/agent.sock\nstate_dir: %s/state\nruntime_dir: %s/run\n", top, top, top)
		if err := os.WriteFile(cfg, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(remoraBin, "--config", cfg, "agent").CombinedOutput()
		if err == nil || !strings.Contains(string(out), "chmod o+x "+filepath.Dir(top)) || !strings.Contains(string(out), "libvirt-qemu") {
			t.Fatalf("err=%v out=%s", err, out)
		}
		// Control: the same agent with the directories made searchable
		// runs (until the test stops it).
		if err := os.Chmod(top, 0o711); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Dir(top), 0o711); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		out, _ = exec.CommandContext(ctx, remoraBin, "--config", cfg, "agent").CombinedOutput()
		if strings.Contains(string(out), "chmod o+x") || !strings.Contains(string(out), "agent running") {
			t.Fatalf("a searchable runtime_dir refused: %s", out)
		}
	})

	t.Run("peer speaks another protocol version", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := dialAgentAs(ctx, labkit.NetnsA, b.addr, labPKI, "host-a")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		f := checkpoint.AppendFrame(nil, checkpoint.Frame{Type: checkpoint.FrameHello, Payload: []byte(`{}`)})
		f[4] = 9 // a future protocol version
		if _, err := conn.Write(f); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		var msg checkpoint.ErrorMsg
		_, err = checkpoint.ReadJSON(bufio.NewReader(conn), checkpoint.FrameWelcome, &msg)
		var pe *checkpoint.PeerError
		if !errors.As(err, &pe) || !strings.Contains(pe.Error(), fmt.Sprintf("v%d", checkpoint.ProtocolVersion)) || !strings.Contains(pe.Error(), "v9") || !pe.Fatal {
			t.Fatalf("want a fatal error naming both versions, got %v", err)
		}
	})

	t.Run("corrupt frame", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := dialAgentAs(ctx, labkit.NetnsA, b.addr, labPKI, "host-a")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		f := checkpoint.AppendFrame(nil, checkpoint.Frame{Type: checkpoint.FrameHello, Payload: []byte(`{"domain":"x"}`)})
		f[len(f)-6] ^= 0xff
		if _, err := conn.Write(f); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		// The standby drops the session without acting on it.
		if _, err := checkpoint.ReadFrame(conn); err == nil {
			t.Fatal("standby answered a corrupt frame")
		}
		if s, ok := b.status("x"); ok {
			t.Fatalf("corrupt hello created a replica: %+v", s)
		}
	})

	t.Run("failover of a guest that is not a replica", func(t *testing.T) {
		out, err := b.cli("vm", "failover", "no-such-domain")
		if err == nil || !strings.Contains(out, "not enrolled") {
			t.Fatalf("err=%v out=%s", err, out)
		}
	})
}
