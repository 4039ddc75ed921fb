//go:build !linux

package labkit

import (
	"context"
	"errors"
	"net"
	"os/exec"
	"path/filepath"
)

var errNoNetns = errors.New("labkit: network namespaces need Linux")

func NetnsPath(ns string) string { return filepath.Join("/run/netns", ns) }

func InNetns(ns string, fn func() error) error { return errNoNetns }

func DialTCPNetns(ctx context.Context, ns, addr string) (net.Conn, error) { return nil, errNoNetns }

func DialNetns(ctx context.Context, ns, addr string) (*Client, error) { return nil, errNoNetns }

func NetnsCommand(ctx context.Context, ns, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...)
}
