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
//	disk RATE      -> "ok" (records per second to the disk; 0 stops the
//	                  disk writer; latency figures restart)
//	diskcheck      -> "ok n=N extra=0|1" or "fail <reason>": records 1..N
//	                  (the ones written) intact on the disk, N+1 there or not
//	stats          -> key=value ... (counter round boundary written rate
//	                  region_pages page_size checks uptime; with a disk
//	                  also disk_records disk_rate disk_slots disk_errors
//	                  disk_checks disk_lat_{avg,p50,p99,max}_us)
//
// Defaults come from the kernel command line (remora.region_pages=,
// remora.rate=, remora.port=, remora.disk=, remora.disk_slots=,
// remora.disk_rate=); flags override them, so it also runs on a host for
// experiments. The disk writer uses O_DIRECT, so a record counts only once
// the virtual disk completed its write.
package main

import (
	"crypto/rand"
	"encoding/binary"
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
	diskPath := flag.String("disk", params["disk"], "disk device for the disk writer (empty: none)")
	diskSlots := flag.Int64("disk-slots", intParam(params, "disk_slots", 4096), "records the disk writer cycles over (0: the whole device)")
	diskRate := flag.Int64("disk-rate", intParam(params, "disk_rate", 0), "initial disk writer rate, records per second")
	diskDirect := flag.Bool("disk-direct", true, "open the disk with O_DIRECT")
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
	var d *DiskWriter
	if *diskPath != "" {
		var seed [8]byte
		rand.Read(seed[:])
		d, err = OpenDiskWriter(*diskPath, *diskDirect, uint64(*diskSlots), binary.LittleEndian.Uint64(seed[:]))
		if err != nil {
			log.Printf("no disk writer: %v", err)
		} else {
			d.SetRate(*diskRate)
			go d.Run(make(chan struct{}))
			log.Printf("disk writer on %s: %d records, %d/s", *diskPath, d.slots, d.Rate())
		}
	}
	s := NewServer(r, w, d)
	go w.Run(make(chan struct{}))
	log.Printf("region %d pages (%d KiB), writer %d pages/s, listening on %s",
		r.Pages(), r.Pages()*PageSize/1024, w.Rate(), l.Addr())
	log.Fatal(s.Serve(l))
}
