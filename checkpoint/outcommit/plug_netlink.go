//go:build linux

package outcommit

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A minimal rtnetlink client for Plug: links (ifb), qdiscs, one filter and
// qdisc statistics. Raw netlink over x/sys/unix rather than a tc library:
// the handful of messages is short, errors keep the kernel's errno and
// extended-ack text, and one qdisc can be read with a GET instead of a dump
// of every qdisc on the host.

const (
	tcHRoot      = 0xFFFFFFFF
	tcHIngress   = 0xFFFFFFF1
	tcHIngressCl = 0xFFFFFFF2 // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS): ingress hook of ingress and clsact qdiscs

	tcaKind    = 1
	tcaOptions = 2
	tcaStats2  = 7

	tcaStatsBasic = 1
	tcaStatsQueue = 3
	tcaStatsPkt64 = 8

	tcaMatchallAct = 2
	tcaActKind     = 1
	tcaActOptions  = 2
	tcaMirredParms = 2
	tcaEgressRedir = 1
	tcActStolen    = 4

	tcqPlugBuffer            = 0
	tcqPlugReleaseOne        = 1
	tcqPlugReleaseIndefinite = 2

	nlaFNested = 0x8000
	ethPAllNet = 0x0300 // htons(ETH_P_ALL): the filter matches every protocol
)

var nlSeq atomic.Uint32

// nlConn is a NETLINK_ROUTE socket, bound to the network namespace of the
// thread that opened it.
type nlConn struct {
	fd int
}

func openNetlink() (*nlConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	// Best effort: the kernel's text for a refused request, and acks
	// without a copy of the request.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	tv := unix.Timeval{Sec: 10}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	return &nlConn{fd: fd}, nil
}

func (c *nlConn) Close() error { return unix.Close(c.fd) }

// nlError is a request the kernel refused.
type nlError struct {
	Errno syscall.Errno
	Msg   string // extended ack text, if any
}

func (e *nlError) Error() string {
	if e.Msg != "" {
		return fmt.Sprintf("%v (%s)", e.Errno, e.Msg)
	}
	return e.Errno.Error()
}

func (e *nlError) Unwrap() error { return e.Errno }

// attrs builds netlink attributes.
type attrs struct{ b []byte }

func (a *attrs) add(typ uint16, data []byte) {
	var h [4]byte
	binary.NativeEndian.PutUint16(h[0:], uint16(4+len(data)))
	binary.NativeEndian.PutUint16(h[2:], typ)
	a.b = append(a.b, h[:]...)
	a.b = append(a.b, data...)
	for len(a.b)%4 != 0 {
		a.b = append(a.b, 0)
	}
}

func (a *attrs) str(typ uint16, s string) { a.add(typ, append([]byte(s), 0)) }
func (a *attrs) nest(typ uint16, f func(*attrs)) {
	var in attrs
	f(&in)
	a.add(typ|nlaFNested, in.b)
}

// parseAttrs splits b into attributes by type (the last one of a type wins).
func parseAttrs(b []byte) map[uint16][]byte {
	m := map[uint16][]byte{}
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b[0:]))
		t := binary.NativeEndian.Uint16(b[2:]) &^ (nlaFNested | 0x4000)
		if l < 4 || l > len(b) {
			break
		}
		m[t] = b[4:l]
		l = (l + 3) &^ 3
		if l > len(b) {
			break
		}
		b = b[l:]
	}
	return m
}

// do sends one request and returns the messages the kernel answered with
// before its ack (the payloads, header stripped).
func (c *nlConn) do(typ uint16, flags uint16, body []byte) ([][]byte, error) {
	seq := nlSeq.Add(1)
	msg := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(body))
	msg = append(msg, body...)
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], typ)
	binary.NativeEndian.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(msg[8:], seq)
	if err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	var out [][]byte
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("netlink receive: %w", err)
		}
		b := buf[:n]
		for len(b) >= unix.NLMSG_HDRLEN {
			l := int(binary.NativeEndian.Uint32(b[0:]))
			mtyp := binary.NativeEndian.Uint16(b[4:])
			mflags := binary.NativeEndian.Uint16(b[6:])
			mseq := binary.NativeEndian.Uint32(b[8:])
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				return nil, errors.New("netlink: truncated message")
			}
			payload := b[unix.NLMSG_HDRLEN:l]
			if al := (l + 3) &^ 3; al <= len(b) {
				b = b[al:]
			} else {
				b = nil
			}
			if mseq != seq {
				continue // a late answer to an earlier request
			}
			switch mtyp {
			case unix.NLMSG_ERROR:
				if len(payload) < 4 {
					return nil, errors.New("netlink: short error message")
				}
				errno := -int32(binary.NativeEndian.Uint32(payload))
				if errno == 0 {
					return out, nil
				}
				e := &nlError{Errno: syscall.Errno(errno)}
				if mflags&unix.NLM_F_ACK_TLVS != 0 {
					// Behind the error code: the request's header (with
					// NETLINK_CAP_ACK) or all of it, then the TLVs.
					skip := 4 + unix.NLMSG_HDRLEN
					if mflags&unix.NLM_F_CAPPED == 0 {
						skip = 4 + len(msg)
					}
					if skip <= len(payload) {
						if m, ok := parseAttrs(payload[skip:])[unix.NLMSGERR_ATTR_MSG]; ok {
							e.Msg = cstring(m)
						}
					}
				}
				return nil, e
			case unix.NLMSG_DONE:
				return out, nil
			default:
				out = append(out, append([]byte(nil), payload...))
			}
		}
	}
}

func cstring(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

func ifinfomsg(index int32, flags, change uint32) []byte {
	var m unix.IfInfomsg
	m.Family = unix.AF_UNSPEC
	m.Index = index
	m.Flags = flags
	m.Change = change
	return structBytes(&m, unix.SizeofIfInfomsg)
}

// sizeofTcmsg is struct tcmsg: family, 3 pad bytes, ifindex, handle, parent, info.
const sizeofTcmsg = 20

func tcmsg(ifindex int32, handle, parent, info uint32) []byte {
	b := make([]byte, sizeofTcmsg)
	b[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(b[4:], uint32(ifindex))
	binary.NativeEndian.PutUint32(b[8:], handle)
	binary.NativeEndian.PutUint32(b[12:], parent)
	binary.NativeEndian.PutUint32(b[16:], info)
	return b
}

func structBytes[T any](p *T, size int) []byte {
	return append([]byte(nil), unsafe.Slice((*byte)(unsafe.Pointer(p)), size)...)
}

// linkIndex returns the index of the link called name (ENODEV if none).
func (c *nlConn) linkIndex(name string) (int, error) {
	var a attrs
	a.str(unix.IFLA_IFNAME, name)
	msgs, err := c.do(unix.RTM_GETLINK, 0, append(ifinfomsg(0, 0, 0), a.b...))
	if err != nil {
		return 0, err
	}
	for _, m := range msgs {
		if len(m) >= unix.SizeofIfInfomsg {
			return int(int32(binary.NativeEndian.Uint32(m[4:8]))), nil
		}
	}
	return 0, unix.ENODEV
}

// addLink creates a link of kind (e.g. "ifb") called name.
func (c *nlConn) addLink(name, kind string) error {
	var a attrs
	a.str(unix.IFLA_IFNAME, name)
	a.nest(unix.IFLA_LINKINFO, func(li *attrs) { li.str(unix.IFLA_INFO_KIND, kind) })
	_, err := c.do(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL, append(ifinfomsg(0, 0, 0), a.b...))
	return err
}

func (c *nlConn) setLinkUp(index int) error {
	_, err := c.do(unix.RTM_NEWLINK, 0, ifinfomsg(int32(index), unix.IFF_UP, unix.IFF_UP))
	return err
}

func (c *nlConn) delLink(index int) error {
	_, err := c.do(unix.RTM_DELLINK, 0, ifinfomsg(int32(index), 0, 0))
	return err
}

// plugOpt is struct tc_plug_qopt.
func plugOpt(action int32, limit uint32) []byte {
	var b [8]byte
	binary.NativeEndian.PutUint32(b[0:], uint32(action))
	binary.NativeEndian.PutUint32(b[4:], limit)
	return b[:]
}

// addPlug makes a plug qdisc with handle the root of ifindex; replace
// swaps it for the one there (whose packets the kernel drops).
func (c *nlConn) addPlug(ifindex int, handle, limit uint32, replace bool) error {
	var a attrs
	a.str(tcaKind, "plug")
	a.add(tcaOptions, plugOpt(tcqPlugBuffer, limit))
	flags := uint16(unix.NLM_F_CREATE | unix.NLM_F_EXCL)
	if replace {
		flags = unix.NLM_F_CREATE | unix.NLM_F_REPLACE
	}
	_, err := c.do(unix.RTM_NEWQDISC, flags, append(tcmsg(int32(ifindex), handle, tcHRoot, 0), a.b...))
	return err
}

// plugAction sends TCQ_PLUG_BUFFER, _RELEASE_ONE or _RELEASE_INDEFINITE.
func (c *nlConn) plugAction(ifindex int, handle uint32, action int32, limit uint32) error {
	var a attrs
	a.str(tcaKind, "plug")
	a.add(tcaOptions, plugOpt(action, limit))
	_, err := c.do(unix.RTM_NEWQDISC, 0, append(tcmsg(int32(ifindex), handle, tcHRoot, 0), a.b...))
	return err
}

func (c *nlConn) addIngress(ifindex int) error {
	var a attrs
	a.str(tcaKind, "ingress")
	_, err := c.do(unix.RTM_NEWQDISC, unix.NLM_F_CREATE|unix.NLM_F_EXCL, append(tcmsg(int32(ifindex), 0xFFFF0000, tcHIngress, 0), a.b...))
	return err
}

func (c *nlConn) delIngress(ifindex int) error {
	_, err := c.do(unix.RTM_DELQDISC, 0, tcmsg(int32(ifindex), 0xFFFF0000, tcHIngress, 0))
	return err
}

// addRedirect adds, at prio on the ingress hook of ifindex, a matchall
// filter whose action is mirred egress redirect to toIndex.
func (c *nlConn) addRedirect(ifindex int, prio uint16, toIndex int) error {
	var parms [28]byte // struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex
	binary.NativeEndian.PutUint32(parms[8:], tcActStolen)
	binary.NativeEndian.PutUint32(parms[20:], tcaEgressRedir)
	binary.NativeEndian.PutUint32(parms[24:], uint32(toIndex))
	var a attrs
	a.str(tcaKind, "matchall")
	a.nest(tcaOptions, func(o *attrs) {
		o.nest(tcaMatchallAct, func(acts *attrs) {
			acts.nest(1, func(act *attrs) {
				act.str(tcaActKind, "mirred")
				act.nest(tcaActOptions, func(mo *attrs) { mo.add(tcaMirredParms, parms[:]) })
			})
		})
	})
	info := uint32(prio)<<16 | ethPAllNet
	_, err := c.do(unix.RTM_NEWTFILTER, unix.NLM_F_CREATE|unix.NLM_F_EXCL, append(tcmsg(int32(ifindex), 0, tcHIngressCl, info), a.b...))
	return err
}

func (c *nlConn) delFilter(ifindex int, prio uint16) error {
	info := uint32(prio)<<16 | ethPAllNet
	_, err := c.do(unix.RTM_DELTFILTER, 0, tcmsg(int32(ifindex), 0, tcHIngressCl, info))
	return err
}

// qdiscStats are a qdisc's kernel counters.
type qdiscStats struct {
	Kind    string
	Handle  uint32
	Bytes   uint64 // dequeued
	Packets uint64 // dequeued (GSO packets count their segments)
	Qlen    uint32 // queued now
	Backlog uint32 // bytes queued now
	Drops   uint32
}

// rootStats reads the root qdisc of ifindex.
func (c *nlConn) rootStats(ifindex int) (qdiscStats, error) {
	var s qdiscStats
	// The kernel answers a qdisc GET as a notification: only to the TC
	// multicast group unless the request asks for an echo.
	msgs, err := c.do(unix.RTM_GETQDISC, unix.NLM_F_ECHO, tcmsg(int32(ifindex), 0, tcHRoot, 0))
	if err != nil {
		return s, err
	}
	for _, m := range msgs {
		if len(m) < sizeofTcmsg {
			continue
		}
		s.Handle = binary.NativeEndian.Uint32(m[8:12])
		at := parseAttrs(m[sizeofTcmsg:])
		s.Kind = cstring(at[tcaKind])
		st := parseAttrs(at[tcaStats2])
		if b := st[tcaStatsBasic]; len(b) >= 12 {
			s.Bytes = binary.NativeEndian.Uint64(b[0:])
			s.Packets = uint64(binary.NativeEndian.Uint32(b[8:]))
		}
		if b := st[tcaStatsPkt64]; len(b) >= 8 {
			s.Packets = binary.NativeEndian.Uint64(b)
		}
		if b := st[tcaStatsQueue]; len(b) >= 12 {
			s.Qlen = binary.NativeEndian.Uint32(b[0:])
			s.Backlog = binary.NativeEndian.Uint32(b[4:])
			s.Drops = binary.NativeEndian.Uint32(b[8:])
		}
		return s, nil
	}
	return s, errors.New("netlink: no qdisc in the answer")
}

// isNotExist reports the errnos of "no such object".
func isNotExist(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV)
}

// noFeature reports the errnos with which the kernel refuses a kind it
// does not know (no module, not built).
func noFeature(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPROTONOSUPPORT)
}
