//go:build linux

package labkit

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// CopyWatch checks remora's first promise on a lab guest: at most one copy
// of the guest serves, i.e. sends frames that reach the bridge. It watches
// the tap of every domain that may run a copy (the guest and its shells)
// and records, per 50 ms window, which copies sent a frame from the
// guest's MAC onto their tap. Frames output commit holds (or drops) never
// reach the tap, so a copy that runs but cannot reach clients does not
// count. (With output_commit: plug the frames reach the tap before the
// plug: watch a guest protected with the qemu backend.)
type CopyWatch struct {
	mac     net.HardwareAddr
	domains []string
	stop    chan struct{}
	wg      sync.WaitGroup

	mu    sync.Mutex
	sends map[int64]map[string]string // window -> copies that sent in it -> their first frame
	last  map[string]time.Time        // a copy's last frame
}

// CopyWindow is the sampling window of a CopyWatch.
const CopyWindow = 50 * time.Millisecond

// WatchCopies starts watching domains (the guest's name and those of its
// shells) for frames from mac.
func WatchCopies(mac string, domains ...string) (*CopyWatch, error) {
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return nil, err
	}
	w := &CopyWatch{mac: hw, domains: domains, stop: make(chan struct{}), sends: map[int64]map[string]string{}, last: map[string]time.Time{}}
	for _, d := range domains {
		w.wg.Add(1)
		go w.watch(d)
	}
	return w, nil
}

// watch follows one domain's tap, reopening it when the domain (re)starts.
func (w *CopyWatch) watch(domain string) {
	defer w.wg.Done()
	for {
		select {
		case <-w.stop:
			return
		default:
		}
		tap := DomainTap(domain)
		if tap == "" {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		w.read(domain, tap)
	}
}

// DomainTap is the host tap of a running domain, or "".
func DomainTap(domain string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := Virsh(ctx, "domiflist", domain)
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "vnet") {
			return f[0]
		}
	}
	return ""
}

// read counts the guest's frames on tap until the tap goes or Stop.
func (w *CopyWatch) read(domain, tap string) {
	ifi, err := net.InterfaceByName(tap)
	if err != nil {
		time.Sleep(100 * time.Millisecond)
		return
	}
	proto := int(htons(unix.ETH_P_ALL))
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, proto)
	if err != nil {
		time.Sleep(100 * time.Millisecond)
		return
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifi.Index}); err != nil {
		time.Sleep(100 * time.Millisecond)
		return
	}
	tv := unix.NsecToTimeval(int64(100 * time.Millisecond))
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	buf := make([]byte, 70000)
	idle := 0
	for {
		select {
		case <-w.stop:
			return
		default:
		}
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			if err == unix.EAGAIN || err == unix.EINTR {
				if idle++; idle%20 == 0 && DomainTap(domain) != tap {
					return // the domain stopped (or its tap changed)
				}
				continue
			}
			return // the tap went away
		}
		idle = 0
		sll, ok := from.(*unix.SockaddrLinklayer)
		if !ok || sll.Pkttype == unix.PACKET_OUTGOING || n < 12 || !bytes.Equal(buf[6:12], w.mac) {
			continue // towards the guest, or not the guest's
		}
		now := time.Now()
		win := now.UnixNano() / int64(CopyWindow)
		w.mu.Lock()
		if w.sends[win] == nil {
			w.sends[win] = map[string]string{}
		}
		if _, seen := w.sends[win][domain]; !seen {
			w.sends[win][domain] = describeFrame(tap, sll.Pkttype, buf[:n])
		}
		w.last[domain] = now
		w.mu.Unlock()
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// describeFrame names a frame for a violation report: where it was seen
// and what it carried.
func describeFrame(tap string, pkttype uint8, f []byte) string {
	d := fmt.Sprintf("%s type %d, %d bytes to %s", tap, pkttype, len(f), net.HardwareAddr(f[:6]))
	if len(f) < 14 {
		return d
	}
	et := uint16(f[12])<<8 | uint16(f[13])
	switch {
	case et == 0x0800 && len(f) >= 34:
		ip := f[14:]
		d += fmt.Sprintf(", IPv4 proto %d %s -> %s", ip[9], net.IP(ip[12:16]), net.IP(ip[16:20]))
	case et == 0x0806:
		d += ", ARP"
	case et == 0x8035:
		d += ", RARP (a QEMU self-announcement)"
	default:
		d += fmt.Sprintf(", ethertype %#04x", et)
	}
	return d
}

// Violation is a window in which more than one copy served.
type Violation struct {
	At     time.Time
	Copies []string
	Frames []string // each copy's first frame in the window
}

func (v Violation) String() string {
	return fmt.Sprintf("%s: %s served at once (%s)", v.At.Format("15:04:05.000"), strings.Join(v.Copies, " and "), strings.Join(v.Frames, "; "))
}

// Violations returns the windows so far in which two or more copies served.
func (w *CopyWatch) Violations() []Violation {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []Violation
	for win, m := range w.sends {
		if len(m) < 2 {
			continue
		}
		v := Violation{At: time.Unix(0, win*int64(CopyWindow))}
		for d := range m {
			v.Copies = append(v.Copies, d)
		}
		sort.Strings(v.Copies)
		for _, d := range v.Copies {
			v.Frames = append(v.Frames, d+": "+m[d])
		}
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].At.Before(out[j].At) })
	return out
}

// LastSent is when copy domain last sent a frame (zero if never).
func (w *CopyWatch) LastSent(domain string) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.last[domain]
}

// Stop ends the watch.
func (w *CopyWatch) Stop() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	w.wg.Wait()
}
