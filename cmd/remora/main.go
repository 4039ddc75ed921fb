// Command remora keeps a hot standby of running libvirt/QEMU guests.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "remora:", err)
		os.Exit(1)
	}
}
