package main

import (
	"bufio"
	"fmt"
	"log"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxRate bounds the writer rate a client can ask for.
const maxRate = 10_000_000

// Server answers the line protocol: one command per line, one reply line
// per command.
type Server struct {
	region *Region
	writer *Writer
	disk   *DiskWriter // nil: no disk
	start  time.Time

	mu      sync.Mutex
	counter uint64
	checks  uint64
}

func NewServer(r *Region, w *Writer, d *DiskWriter) *Server {
	return &Server{region: r, writer: w, disk: d, start: time.Now()}
}

// Handle executes one command line and returns the reply (without newline).
func (s *Server) Handle(line string) string {
	f := strings.Fields(line)
	if len(f) == 0 {
		return "err empty command"
	}
	switch cmd := strings.ToLower(f[0]); cmd {
	case "inc":
		s.mu.Lock()
		s.counter++
		v := s.counter
		s.mu.Unlock()
		return strconv.FormatUint(v, 10)
	case "get":
		s.mu.Lock()
		v := s.counter
		s.mu.Unlock()
		return strconv.FormatUint(v, 10)
	case "check":
		round, boundary, err := s.region.Check()
		s.mu.Lock()
		s.checks++
		s.mu.Unlock()
		if err != nil {
			return "fail " + err.Error()
		}
		return fmt.Sprintf("ok round=%d boundary=%d", round, boundary)
	case "writer":
		if len(f) != 2 {
			return "err usage: writer PAGES_PER_SEC"
		}
		rate, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil || rate < 0 || rate > maxRate {
			return fmt.Sprintf("err bad rate %q (0..%d)", f[1], maxRate)
		}
		s.writer.SetRate(rate)
		return "ok"
	case "disk":
		if s.disk == nil {
			return "err no disk (remora.disk=)"
		}
		if len(f) != 2 {
			return "err usage: disk RECORDS_PER_SEC"
		}
		rate, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil || rate < 0 || rate > maxRate {
			return fmt.Sprintf("err bad rate %q (0..%d)", f[1], maxRate)
		}
		s.disk.SetRate(rate)
		s.disk.ResetLatency() // figures from here on are of this rate
		return "ok"
	case "discard":
		if s.disk == nil {
			return "err no disk (remora.disk=)"
		}
		if len(f) != 2 {
			return "err usage: discard MIB"
		}
		mib, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil || mib == 0 {
			return fmt.Sprintf("err bad size %q", f[1])
		}
		what, err := s.disk.Discard(mib << 20)
		if err != nil {
			return "fail " + err.Error()
		}
		return "ok " + what
	case "diskcheck":
		if s.disk == nil {
			return "err no disk (remora.disk=)"
		}
		n, extra, err := s.disk.Check()
		if err != nil {
			return "fail " + err.Error()
		}
		return fmt.Sprintf("ok n=%d extra=%d", n, extra)
	case "stats":
		s.mu.Lock()
		counter, checks := s.counter, s.checks
		s.mu.Unlock()
		round, boundary, written := s.region.State()
		line := fmt.Sprintf("counter=%d round=%d boundary=%d written=%d rate=%d region_pages=%d page_size=%d checks=%d uptime=%.3f",
			counter, round, boundary, written, s.writer.Rate(), s.region.Pages(), PageSize, checks,
			time.Since(s.start).Seconds())
		if s.disk != nil {
			d := s.disk.Stats()
			line += fmt.Sprintf(" disk_records=%d disk_rate=%d disk_slots=%d disk_errors=%d disk_checks=%d disk_lat_avg_us=%d disk_lat_p50_us=%d disk_lat_p99_us=%d disk_lat_max_us=%d",
				d.Count, d.Rate, d.Slots, d.Errors, d.Checks, d.LatAvg.Microseconds(), d.LatP50.Microseconds(),
				d.LatP99.Microseconds(), d.LatMax.Microseconds())
		}
		return line
	default:
		return fmt.Sprintf("err unknown command %q (inc, get, check, writer N, disk N, discard MIB, diskcheck, stats)", cmd)
	}
}

// Serve accepts connections until l is closed.
func (s *Server) Serve(l net.Listener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			return err
		}
		go s.serveConn(c)
	}
}

func (s *Server) serveConn(c net.Conn) {
	defer c.Close()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 4096), 4096)
	w := bufio.NewWriter(c)
	for sc.Scan() {
		reply := s.Handle(sc.Text())
		w.WriteString(reply)
		w.WriteByte('\n')
		if err := w.Flush(); err != nil {
			return
		}
	}
	if err := sc.Err(); err != nil {
		log.Printf("connection %s: %v", c.RemoteAddr(), err)
	}
}
