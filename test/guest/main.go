// Command guest is the workload that runs inside a lab guest (see
// test/lab/lab.sh, which builds it statically into the initramfs).
//
// It holds a counter and an integrity region in guest memory and answers a
// line protocol on TCP port 7000:
//
//	inc            -> new counter value
//	get            -> counter value
//	check          -> "ok round=G boundary=K" or "fail <reason>"
//	writer RATE    -> "ok" (pages per second; 0 stops the memory writer)
//	stats          -> key=value ... (counter round boundary written rate
//	                  region_pages page_size checks uptime)
//
// Defaults come from the kernel command line (remora.region_pages=,
// remora.rate=, remora.port=); flags override them, so it also runs on a
// host for experiments.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"strconv"
	"strings"
)

// cmdlineParams returns the remora.* parameters of a kernel command line,
// without the "remora." prefix.
func cmdlineParams(cmdline string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(cmdline) {
		k, v, ok := strings.Cut(f, "=")
		if ok && strings.HasPrefix(k, "remora.") {
			m[strings.TrimPrefix(k, "remora.")] = v
		}
	}
	return m
}

func intParam(m map[string]string, key string, def int64) int64 {
	if s, ok := m[key]; ok {
		if v, err := strconv.ParseInt(s, 10, 64); err == nil && v >= 0 {
			return v
		}
		log.Printf("ignoring bad kernel parameter remora.%s=%q", key, s)
	}
	return def
}

func main() {
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.SetPrefix("remora-guest: ")
	var params map[string]string
	if b, err := os.ReadFile("/proc/cmdline"); err == nil {
		params = cmdlineParams(string(b))
	}
	pages := flag.Int64("region-pages", intParam(params, "region_pages", 8192), "integrity region size in 4 KiB pages")
	rate := flag.Int64("rate", intParam(params, "rate", 2000), "initial writer rate, pages per second (0: stopped)")
	port := flag.Int64("port", intParam(params, "port", 7000), "TCP port")
	flag.Parse()
	if *pages < 1 || *pages > 1<<22 {
		log.Fatalf("region pages %d out of range", *pages)
	}

	r := NewRegion(int(*pages))
	// Listen only once the region is stamped: a client that gets an answer
	// can run check at once.
	l, err := net.Listen("tcp", fmt.Sprintf(":%d", *port))
	if err != nil {
		log.Fatal(err)
	}
	w := NewWriter(r, *rate)
	s := NewServer(r, w)
	go w.Run(make(chan struct{}))
	log.Printf("region %d pages (%d KiB), writer %d pages/s, listening on %s",
		r.Pages(), r.Pages()*PageSize/1024, w.Rate(), l.Addr())
	log.Fatal(s.Serve(l))
}
