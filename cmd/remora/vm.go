package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/pki"
)

// agentClient is the admin API client of the agent the command line
// names: this host's (its api_socket) or --agent's over mutual TLS.
func agentClient(cmd *cobra.Command) (*api.Client, error) {
	cfg, err := loadAgentConfig(cmd)
	if err != nil {
		return nil, err
	}
	if addr, _ := cmd.Flags().GetString("agent"); addr != "" {
		// A remote agent: mutual TLS with this host's certificate.
		if cfg.TLSCert == "" {
			return nil, fmt.Errorf("--agent %s needs tls_cert, tls_key and tls_ca in the config (the agent's API over TCP is mutual TLS only)", addr)
		}
		tlsCfg, err := pki.ClientConfigFiles(cfg.TLSCert, cfg.TLSKey, cfg.TLSCA)
		if err != nil {
			return nil, err
		}
		if host, _, err := net.SplitHostPort(addr); err == nil {
			tlsCfg.ServerName = host
		}
		return api.NewTLSClient(addr, tlsCfg), nil
	}
	return api.NewClient(cfg.APISocket), nil
}

func newVMCmd() *cobra.Command {
	vm := &cobra.Command{Use: "vm", Short: "Enroll, inspect, switch and fail over protected guests"}
	client := agentClient
	vm.PersistentFlags().String("agent", "", "a remote agent's admin API (host:port of its api_listen), over mutual TLS")

	enroll := &cobra.Command{
		Use:   "enroll GUEST --standby HOST:PORT",
		Short: "Protect a running guest of this host on a standby host",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client(cmd)
			if err != nil {
				return err
			}
			standby, _ := cmd.Flags().GetString("standby")
			if standby == "" {
				return fmt.Errorf("--standby is required: the standby agent's replication address, e.g. 10.0.0.2:7400")
			}
			probeFlag, _ := cmd.Flags().GetString("probe")
			probe, err := parseProbe(probeFlag)
			if err != nil {
				return err
			}
			if err := c.Enroll(cmd.Context(), args[0], standby, probe); err != nil {
				return err
			}
			fmt.Printf("%s enrolled; standby %s\n", args[0], standby)
			if wait, _ := cmd.Flags().GetBool("wait"); !wait {
				return nil
			}
			timeout, _ := cmd.Flags().GetDuration("timeout")
			return waitProtected(cmd.Context(), c, args[0], timeout)
		},
	}
	enroll.Flags().String("standby", "", "standby agent's replication address (host:port)")
	enroll.Flags().Bool("wait", true, "wait for the initial sync, showing progress")
	enroll.Flags().String("probe", "", "how the arbiter checks the guest's service from the clients' side: tcp:HOST:PORT or line:HOST:PORT:SEND:EXPECTED-PREFIX")
	enroll.Flags().Duration("timeout", 10*time.Minute, "how long to wait for the initial sync")

	status := &cobra.Command{
		Use:   "status [GUEST]",
		Short: "Show every guest this agent protects or replicates, or one",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client(cmd)
			if err != nil {
				return err
			}
			var st []api.VMStatus
			if len(args) == 1 {
				var one api.VMStatus
				one, err = c.VM(cmd.Context(), args[0])
				st = []api.VMStatus{one}
			} else {
				st, err = c.Status(cmd.Context())
			}
			if err != nil {
				return err
			}
			if j, _ := cmd.Flags().GetBool("json"); j {
				return printJSON(st)
			}
			printStatus(st)
			// An older agent has no /v1/agent: its warnings are in its log.
			if info, err := c.Agent(cmd.Context()); err == nil {
				for _, w := range info.Warnings {
					fmt.Fprintf(os.Stderr, "warning: agent %s: %s\n", info.Agent, w)
				}
			}
			return nil
		},
	}
	status.Flags().Bool("json", false, "print JSON")

	events := &cobra.Command{
		Use:   "events GUEST",
		Short: "Show a guest's history on this agent: enrolls, state changes, syncs, failovers, fencing epochs",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client(cmd)
			if err != nil {
				return err
			}
			ev, err := c.Events(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if j, _ := cmd.Flags().GetBool("json"); j {
				return printJSON(ev)
			}
			printEvents(ev)
			return nil
		},
	}
	events.Flags().Bool("json", false, "print JSON")

	failover := &cobra.Command{
		Use:   "failover GUEST",
		Short: "On the standby host: resume the guest from its last acknowledged epoch",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client(cmd)
			if err != nil {
				return err
			}
			force, _ := cmd.Flags().GetBool("force")
			res, err := c.Failover(cmd.Context(), args[0], force)
			if err != nil {
				return err
			}
			fmt.Printf("%s failed over: running here from epoch %d (fencing epoch %d) in %s\n", res.Guest, res.Epoch, res.Fence, res.Duration.Round(time.Millisecond))
			return nil
		},
	}
	failover.Flags().Bool("force", false, "fail over even though the primary still replicates (it must be dead or fenced)")

	reprotect := &cobra.Command{
		Use:   "reprotect GUEST [--standby HOST:PORT]",
		Short: "On the host a guest failed over to: protect it again, onto its old primary's host (offered through the arbiter) or another standby",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client(cmd)
			if err != nil {
				return err
			}
			standby, _ := cmd.Flags().GetString("standby")
			if err := c.Reprotect(cmd.Context(), args[0], standby); err != nil {
				return err
			}
			onto := standby
			if onto == "" {
				onto = "the standby the arbiter names"
			}
			fmt.Printf("%s re-protected onto %s\n", args[0], onto)
			if wait, _ := cmd.Flags().GetBool("wait"); !wait {
				return nil
			}
			timeout, _ := cmd.Flags().GetDuration("timeout")
			return waitProtected(cmd.Context(), c, args[0], timeout)
		},
	}
	reprotect.Flags().String("standby", "", "the new standby agent's replication address (host:port); default: the one the arbiter names")
	reprotect.Flags().Bool("wait", true, "wait for the sync, showing progress")
	reprotect.Flags().Duration("timeout", 10*time.Minute, "how long to wait for the sync")

	// A planned move of one guest, printed as it went.
	moveCmd := func(use, short string, move func(*api.Client, context.Context, string) (api.SwitchoverResult, error)) *cobra.Command {
		return &cobra.Command{
			Use: use, Short: short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := client(cmd)
				if err != nil {
					return err
				}
				res, err := move(c, cmd.Context(), args[0])
				if err != nil {
					return err
				}
				printMove(res)
				return nil
			},
		}
	}
	switchover := moveCmd("switchover GUEST", "On the primary host: move the guest to its standby with no loss (planned); this host becomes its standby", (*api.Client).Switchover)
	failback := moveCmd("failback GUEST", "On the host a guest runs on: switch it over to its home host (the host it was enrolled from, its standby now)", (*api.Client).Failback)

	unenroll := &cobra.Command{
		Use:   "unenroll GUEST",
		Short: "Stop protecting a guest (it keeps running); the standby drops its replica",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client(cmd)
			if err != nil {
				return err
			}
			if err := c.Unenroll(cmd.Context(), args[0]); err != nil {
				return err
			}
			fmt.Printf("%s unenrolled\n", args[0])
			return nil
		},
	}
	// Shell completion of GUEST asks the agent; role "" takes any guest.
	guests := func(role string) cobra.CompletionFunc {
		return func(cmd *cobra.Command, args []string, prefix string) ([]string, cobra.ShellCompDirective) {
			if len(args) > 0 {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			c, err := client(cmd)
			if err != nil {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			ctx, cancel := context.WithTimeout(cmdContext(cmd), 2*time.Second)
			defer cancel()
			st, err := c.Status(ctx)
			if err != nil {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			return guestNames(st, role, prefix), cobra.ShellCompDirectiveNoFileComp
		}
	}
	failover.ValidArgsFunction = guests(api.RoleStandby)
	reprotect.ValidArgsFunction = guests(api.RolePromoted)
	switchover.ValidArgsFunction = guests(api.RolePrimary)
	failback.ValidArgsFunction = guests(api.RolePrimary)
	unenroll.ValidArgsFunction = guests("")
	status.ValidArgsFunction = guests("")
	events.ValidArgsFunction = guests("")
	enroll.ValidArgsFunction = cobra.NoFileCompletions
	vm.AddCommand(enroll, status, events, failover, reprotect, switchover, failback, unenroll)
	return vm
}

func printMove(res api.SwitchoverResult) {
	if res.Epoch == 0 { // asked of its primary (undrain): it knows the figures
		fmt.Printf("%s switched over from %s to %s; took %s\n", res.Guest, res.From, res.To, res.Downtime.Round(time.Millisecond))
		return
	}
	fmt.Printf("%s switched over from %s to %s: runs there from epoch %d (fencing epoch %d); downtime %s\n",
		res.Guest, res.From, res.To, res.Epoch, res.Fence, res.Downtime.Round(time.Millisecond))
}

func newHostCmd() *cobra.Command {
	host := &cobra.Command{Use: "host", Short: "Maintenance of this host: switch its guests to their standbys and back"}
	host.PersistentFlags().String("agent", "", "a remote agent's admin API (host:port of its api_listen), over mutual TLS")
	report := func(out []api.MoveOutcome, what string) error {
		failed := 0
		for _, o := range out {
			if o.Error != "" {
				failed++
				fmt.Printf("%s: %s\n", o.Guest, o.Error)
				continue
			}
			printMove(o.Result)
		}
		if len(out) == 0 {
			fmt.Printf("no guest to %s\n", what)
		}
		if failed > 0 {
			return fmt.Errorf("%d of %d guests not moved", failed, len(out))
		}
		return nil
	}
	moveAll := func(use, short, verb string, call func(*api.Client, context.Context) ([]api.MoveOutcome, error)) *cobra.Command {
		return &cobra.Command{
			Use:   use,
			Short: short,
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := agentClient(cmd)
				if err != nil {
					return err
				}
				out, err := call(c, cmd.Context())
				if err != nil {
					return err
				}
				return report(out, verb)
			},
		}
	}
	drain := moveAll("drain", "Switch every guest this host runs as primary over to its standby, one at a time", "drain", (*api.Client).Drain)
	undrain := moveAll("undrain", "Switch back every guest whose home is this host and which it keeps a replica of", "bring back", (*api.Client).Undrain)
	host.AddCommand(drain, undrain)
	return host
}

// guestNames are the guests in st with role (any, if empty) whose name
// starts with prefix.
func guestNames(st []api.VMStatus, role, prefix string) []string {
	var names []string
	for _, v := range st {
		if (role == "" || v.Role == role) && strings.HasPrefix(v.Guest, prefix) {
			names = append(names, v.Guest)
		}
	}
	return names
}

func waitProtected(ctx context.Context, c *api.Client, name string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tty := isTerminal(os.Stdout)
	last := ""
	for {
		st, err := c.Status(ctx)
		if err != nil {
			return err
		}
		for _, s := range st {
			if s.Guest != name || s.Role != api.RolePrimary {
				continue
			}
			line := ""
			switch {
			case s.State == checkpoint.StateProtected:
				fmt.Printf("\r%s protected: epoch %d acknowledged by %s\n", name, s.AckedEpoch, s.Peer)
				return nil
			case s.State == checkpoint.StateSyncing && s.SyncTotal > 0:
				line = fmt.Sprintf("initial sync: %s / %s (%.0f%%)", human(s.SyncDone), human(s.SyncTotal), 100*float64(s.SyncDone)/float64(s.SyncTotal))
			case s.LastError != "":
				line = fmt.Sprintf("%s: %s (retrying)", s.State, s.LastError)
			default:
				line = s.State
			}
			if line != last {
				if tty {
					fmt.Printf("\r%-100s", line)
				} else {
					fmt.Println(line)
				}
				last = line
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not protected after %s (last: %s); see `remora vm status`", name, timeout, last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// parseProbe reads tcp:HOST:PORT or line:HOST:PORT:SEND:PREFIX.
func parseProbe(s string) (arbiter.ProbeSpec, error) {
	if s == "" {
		return arbiter.ProbeSpec{}, nil
	}
	parts := strings.SplitN(s, ":", 5)
	bad := fmt.Errorf("--probe %q: want tcp:HOST:PORT or line:HOST:PORT:SEND:EXPECTED-PREFIX", s)
	if len(parts) < 3 {
		return arbiter.ProbeSpec{}, bad
	}
	if port, err := strconv.Atoi(parts[2]); err != nil || port < 1 || port > 65535 {
		return arbiter.ProbeSpec{}, bad
	}
	p := arbiter.ProbeSpec{Kind: arbiter.ProbeKind(parts[0]), Address: net.JoinHostPort(parts[1], parts[2])}
	switch {
	case p.Kind == arbiter.ProbeTCP && len(parts) == 3:
	case p.Kind == arbiter.ProbeLine && len(parts) == 5:
		p.Send, p.ExpectPrefix = parts[3], parts[4]
	default:
		return arbiter.ProbeSpec{}, bad
	}
	if err := p.Validate(); err != nil {
		return arbiter.ProbeSpec{}, fmt.Errorf("--probe: %w", err)
	}
	return p, nil
}

func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printEvents(ev []api.Event) {
	if len(ev) == 0 {
		fmt.Println("no events recorded yet")
		return
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "TIME\tEVENT\tFENCE\tEPOCH\tDETAIL")
	for _, e := range ev {
		t := "-"
		if !e.Time.IsZero() {
			t = e.Time.Local().Format("2006-01-02 15:04:05.000")
		}
		epoch := "-"
		if e.Epoch != 0 {
			epoch = strconv.FormatUint(e.Epoch, 10)
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", t, e.Kind, e.Fence, epoch, e.Detail)
	}
	w.Flush()
}

func printStatus(st []api.VMStatus) {
	if len(st) == 0 {
		fmt.Println("no guests enrolled on this agent")
		return
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "GUEST\tROLE\tSTATE\tFENCE\tEPOCH\tACKED\tEPOCHS/S\tPAUSE P50/P99\tDIRTY\tBYTES\tLAG\tPEER")
	var notes []string
	for _, s := range st {
		pause := "-"
		if s.Role == api.RolePrimary {
			pause = fmt.Sprintf("%s/%s", ms(s.PauseP50), ms(s.PauseP99))
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%d\t%.1f\t%s\t%d\t%s\t%s\t%s\n", s.Guest, s.Role, s.State, s.Fence, s.Epoch, s.AckedEpoch,
			s.EpochsPerSec, pause, s.DirtyPages, human(s.Bytes), ms(s.Lag), s.Peer)
		var co []string
		if s.LeaseHolder != "" {
			co = append(co, fmt.Sprintf("lease %s %s left", s.LeaseHolder, ms(s.LeaseValid)))
		}
		if s.Heartbeat != "" {
			co = append(co, "heartbeat "+s.Heartbeat)
		}
		if s.Probe != "" {
			co = append(co, "service probe "+s.Probe)
		}
		if s.Arbiter != "" {
			co = append(co, "arbiter: "+s.Arbiter)
		}
		if o := s.Output; o != nil {
			hold := "holding"
			if !o.Holding {
				hold = "not holding (unprotected)"
			}
			co = append(co, fmt.Sprintf("output commit %s %s: %d frames/%s held, released up to epoch %d, hold p50/p99 %s/%s, dropped %d, discarded %d",
				o.Backend, hold, o.HeldFrames, human(uint64(o.HeldBytes)), o.LastReleased, ms(o.ReleaseP50), ms(o.ReleaseP99), o.DroppedFrames, o.DiscardedFrames))
		}
		if d := s.Disk; d != nil {
			line := fmt.Sprintf("disks %s %s", strings.Join(d.Devs, ","), d.State)
			if d.SyncTotal > 0 && d.SyncDone < d.SyncTotal {
				line += fmt.Sprintf(" %d%%", d.SyncDone*100/d.SyncTotal)
			}
			if s.Role == api.RolePrimary {
				line += fmt.Sprintf(" (full copies: %d)", d.Resyncs)
			} else {
				line += fmt.Sprintf(": last epoch %d writes/%s, %d epochs/%s buffered, %s applied", d.LastEpochWrites, human(uint64(d.LastEpochBytes)),
					d.HeldEpochs, human(uint64(d.HeldBytes)), human(d.AppliedBytes))
				if d.OutOfSync != "" {
					line += " (" + d.OutOfSync + ")"
				}
			}
			co = append(co, line)
		}
		if len(co) > 0 {
			notes = append(notes, fmt.Sprintf("%s: %s", s.Guest, strings.Join(co, "; ")))
		}
		if s.LastError != "" {
			retry := ""
			if !s.NextRetry.IsZero() {
				retry = fmt.Sprintf(" (next retry in %s)", time.Until(s.NextRetry).Round(100*time.Millisecond))
			}
			notes = append(notes, fmt.Sprintf("%s: %s%s", s.Guest, s.LastError, retry))
		}
	}
	w.Flush()
	if len(notes) > 0 {
		fmt.Println(strings.Join(notes, "\n"))
	}
}

func ms(d time.Duration) string {
	return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
}

func human(b uint64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%dB", b)
	}
	div, exp := uint64(unit), 0
	for n := b / unit; n >= unit; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(b)/float64(div), "KMGTPE"[exp])
}
