package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/remora-ha/remora/internal/sdnotify"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/internal/pki"
)

func arbiterCmd() *cobra.Command {
	var configPath string
	cmd := &cobra.Command{
		Use:   "arbiter",
		Short: "Run the arbiter that grants leases, promotions and fencing epochs",
		Long: `Run the arbiter: the third party that decides which agent may run each
protected guest. Configuration comes from the YAML file given with --config,
then REMORA_ARBITER_* environment variables (e.g. REMORA_ARBITER_LEASE_DURATION,
REMORA_ARBITER_TLS_CERT), then flags. Unknown keys in the file are an error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadArbiterConfig(cmd, configPath)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmdContext(cmd), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runArbiter(ctx, cfg, cmd.ErrOrStderr())
		},
	}
	cmd.PersistentFlags().StringVar(&configPath, "config", "", "YAML configuration file")
	f := cmd.Flags()
	f.String("listen", "", "listen address (host:port)")
	f.String("state-dir", "", "directory for durable arbiter state")
	f.Duration("lease-duration", 0, "primary lease duration")
	f.String("log-level", "", "debug, info, warn or error")
	f.String("log-format", "", "text or json")
	f.String("metrics-listen", "", "serve Prometheus metrics at /metrics on host:port (plain HTTP); empty: none")
	cmd.AddCommand(statusCmd(&configPath))
	return cmd
}

func cmdContext(cmd *cobra.Command) context.Context {
	if ctx := cmd.Context(); ctx != nil {
		return ctx
	}
	return context.Background()
}

func runArbiter(ctx context.Context, cfg *arbiterConfig, logOut io.Writer) error {
	logger, err := newLogger(cfg.LogLevel, cfg.LogFormat, logOut)
	if err != nil {
		return err
	}
	tc, err := pki.ServerConfigFiles(cfg.TLS.Cert, cfg.TLS.Key, cfg.TLS.CA)
	if err != nil {
		return err
	}
	sc := cfg.serverConfig()
	sc.TLS = tc
	sc.Logger = logger
	if hb := sc.Heartbeat.Timeout(); hb*2 > sc.LeaseDuration {
		logger.Warn("arbiter: heartbeat timeout is more than half the lease; standby-lost decisions will lag", "heartbeat_timeout", hb, "lease", sc.LeaseDuration)
	}
	srv, err := arbiter.Open(sc)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		srv.Close()
		return err
	}
	logger.Info("arbiter: listening", "addr", ln.Addr().String(), "state_dir", cfg.StateDir, "lease", cfg.LeaseDuration)
	if cfg.MetricsListen != "" {
		ml, err := net.Listen("tcp", cfg.MetricsListen)
		if err != nil {
			ln.Close()
			srv.Close()
			return fmt.Errorf("listen for metrics on %s: %w (change metrics_listen, or leave it empty to serve none)", cfg.MetricsListen, err)
		}
		mctx, stopMetrics := context.WithCancel(ctx)
		defer stopMetrics()
		go serveArbiterMetrics(mctx, ml, srv, map[string]string{"arbiter": cfg.TLS.Cert, "ca": cfg.TLS.CA}, logger)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	if _, err := sdnotify.Notify(sdnotify.Ready); err != nil {
		logger.Warn("arbiter: cannot tell the service manager it is ready", "err", err)
	}
	wctx, stopWatchdog := context.WithCancel(ctx)
	defer stopWatchdog()
	go sdnotify.Watchdog(wctx, func() error { srv.Status(); return nil }) // its state lock is free
	select {
	case <-ctx.Done():
		_, _ = sdnotify.Notify(sdnotify.Stopping)
		logger.Info("arbiter: shutting down")
		err := srv.Close()
		<-errc
		return err
	case err := <-errc:
		srv.Close()
		return err
	}
}

func statusCmd(configPath *string) *cobra.Command {
	var (
		addr, serverName string
		asJSON           bool
		timeout          time.Duration
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show guests, epochs, leases and probe results",
		Long: `Query a running arbiter. It connects with the certificate from the same
configuration (tls.cert/key/ca) to --addr, or to the configured listen
address with an unspecified host replaced by 127.0.0.1.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadArbiterConfig(cmd, *configPath)
			if err != nil {
				return err
			}
			if addr == "" {
				addr, err = localAddr(cfg.Listen)
				if err != nil {
					return err
				}
			}
			tc, err := pki.ClientConfigFiles(cfg.TLS.Cert, cfg.TLS.Key, cfg.TLS.CA)
			if err != nil {
				return err
			}
			// By default expect the arbiter to present the certificate we
			// are using, so 127.0.0.1 need not be in its SANs.
			tc.ServerName = serverName
			if tc.ServerName == "" {
				if leaf, err := x509.ParseCertificate(tc.Certificates[0].Certificate[0]); err == nil {
					tc.ServerName = leaf.Subject.CommonName
				}
			}
			ctx, cancel := context.WithTimeout(cmdContext(cmd), timeout)
			defer cancel()
			c, err := arbiter.Dial(ctx, addr, tc)
			if err != nil {
				return err
			}
			defer c.Close()
			st, err := c.Status(ctx)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printArbiterStatus(cmd.OutOrStdout(), st)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&addr, "addr", "", "arbiter address (default: from listen)")
	f.StringVar(&serverName, "server-name", "", "expected arbiter certificate name (default: CN of tls.cert)")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	f.DurationVar(&timeout, "timeout", 5*time.Second, "request timeout")
	return cmd
}

func localAddr(listen string) (string, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("listen %q: %w", listen, err)
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

func printArbiterStatus(w io.Writer, st arbiter.Status) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "GUEST\tEPOCH\tPRIMARY\tSTANDBY\tIN SYNC\tLEASE HOLDER\tLEASE\tSERVICE\tLAST CHANGE\n")
	for _, g := range st.Guests {
		if g.Recovering != nil {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t-\t%s\n", g.Guest, recoveryText(g.Recovering))
			continue
		}
		last := "-"
		if g.Last != nil {
			last = fmt.Sprintf("%s %d->%d %s", g.Last.Kind, g.Last.From, g.Last.To, g.Last.At.Local().Format(time.DateTime))
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			g.Guest, g.Epoch, dash(g.Primary), dash(g.Standby), yesNo(g.InSync), dash(g.LeaseHolder), leaseText(g), probeText(g.Service), last)
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "AGENT\tADDRESS\tLAST HEARTBEAT\tREACHABILITY\n")
	for _, a := range st.Agents {
		hb := "never"
		if !a.LastHeartbeat.IsZero() {
			hb = fmt.Sprintf("%v ago", st.Now.Sub(a.LastHeartbeat).Round(time.Millisecond))
		}
		if a.HeartbeatSuspected {
			hb += " (lost)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", a.Agent, dash(a.Addr), hb, probeText(a.Reachability))
	}
	tw.Flush()
}

func leaseText(g arbiter.GuestStatus) string {
	switch {
	case g.LeaseHolder == "":
		return "-"
	case g.LeaseRemaining <= 0:
		return "expired " + g.LeaseExpires.Local().Format("15:04:05.000")
	}
	text := fmt.Sprintf("%v left (until %s)", g.LeaseRemaining.Round(10*time.Millisecond), g.LeaseExpires.Local().Format("15:04:05.000"))
	if !g.SuspendedUntil.IsZero() {
		text = "suspended, " + text
	}
	return text
}

func recoveryText(r *arbiter.RecoveryStatus) string {
	if r.Stuck != "" {
		return "recovery stuck: " + r.Stuck
	}
	return fmt.Sprintf("recovering until %s (%d claims)", r.Until.Local().Format("15:04:05"), len(r.Claims))
}

func probeText(p *arbiter.ProbeStatus) string {
	switch {
	case p == nil:
		return "-"
	case p.At.IsZero():
		return "pending"
	case p.OK:
		return fmt.Sprintf("ok %v", p.Latency.Round(10*time.Microsecond))
	}
	return fmt.Sprintf("FAIL x%d: %s", p.ConsecutiveFailures, p.Error)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
