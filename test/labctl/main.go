// Command labctl drives lab guests for the demo and the benchmark:
//
//	labctl boot NAME INDEX [RATE]   boot a lab guest at labkit.GuestIP(INDEX)
//	labctl do NAME|ADDR CMD...      send workload commands (inc, get, check, writer N, stats)
//	labctl destroy NAME...          destroy and undefine guests
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/remora-ha/remora/test/labkit"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "labctl:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) < 2 {
		return fmt.Errorf("usage: labctl boot NAME INDEX [RATE] | do ADDR CMD... | destroy NAME")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	switch args[0] {
	case "boot":
		if len(args) < 3 {
			return fmt.Errorf("usage: labctl boot NAME INDEX [RATE]")
		}
		idx, err := strconv.Atoi(args[2])
		if err != nil {
			return err
		}
		o := labkit.GuestOptions{Name: args[1], IP: labkit.GuestIP(idx)}
		if len(args) > 3 {
			if o.Rate, err = strconv.Atoi(args[3]); err != nil {
				return err
			}
		}
		g, err := labkit.Boot(ctx, o)
		if err != nil {
			return err
		}
		fmt.Printf("guest %s booted in %s; workload at %s\n", g.Name, g.BootTime.Round(time.Millisecond), g.Addr())
	case "do":
		addr := args[1]
		if _, _, err := net.SplitHostPort(addr); err != nil {
			addr = net.JoinHostPort(addr, strconv.Itoa(labkit.GuestPort))
		}
		c, err := labkit.DialContext(ctx, addr)
		if err != nil {
			return err
		}
		defer c.Close()
		for _, cmd := range args[2:] {
			r, err := c.Do(ctx, cmd)
			if err != nil {
				return fmt.Errorf("%s: %w", cmd, err)
			}
			fmt.Printf("%s -> %s\n", cmd, r)
		}
	case "destroy":
		for _, n := range args[1:] {
			if err := labkit.Destroy(n); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("unknown command %q", args[0])
	}
	return nil
}
