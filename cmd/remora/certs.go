package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/internal/pki"
)

func certsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "certs",
		Short: "Manage the lab CA and component certificates for mutual TLS",
	}
	cmd.AddCommand(certsInitCmd(), certsIssueCmd(), certsClusterCmd(), certsShowCmd(), certsRenewCmd())
	return cmd
}

func certsInitCmd() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "init DIR",
		Short: "Create a CA (ca.crt, ca.key) in DIR",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := pki.InitCA(args[0], force); err != nil {
				if errors.Is(err, pki.ErrCAExists) {
					return fmt.Errorf("%w (pass --force to replace it; every issued certificate stops working)", err)
				}
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created CA in %s\n", args[0])
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "replace an existing CA")
	return cmd
}

func certsIssueCmd() *cobra.Command {
	var (
		dir string
		ips []string
	)
	cmd := &cobra.Command{
		Use:   "issue NAME",
		Short: "Issue NAME.crt/NAME.key (server and client auth) from the CA in --dir",
		Long: `Issue a certificate whose CommonName and DNS SAN are NAME. For agents NAME
must be the agent id; for the arbiter, add --ip for each address agents dial.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			parsed, err := parseIPs("--ip", ips)
			if err != nil {
				return err
			}
			if err := pki.Issue(dir, args[0], parsed...); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "issued %s and %s\n", pki.CertPath(dir, args[0]), pki.KeyPath(dir, args[0]))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "PKI directory holding the CA (required)")
	cmd.Flags().StringSliceVar(&ips, "ip", nil, "IP SAN (repeatable or comma-separated)")
	cmd.MarkFlagRequired("dir")
	return cmd
}

func parseIPs(flag string, ss []string) ([]net.IP, error) {
	var out []net.IP
	for _, s := range ss {
		ip := net.ParseIP(s)
		if ip == nil {
			return nil, fmt.Errorf("%s: %q is not an IP address", flag, s)
		}
		out = append(out, ip)
	}
	return out, nil
}

// component is one certificate that `certs cluster` manages.
type component struct {
	role string // agent, arbiter or admin
	name string
	ips  []net.IP
}

// parseComponent reads a --agent/--arbiter/--admin value: NAME[=IP,...].
func parseComponent(role, spec string) (component, error) {
	name, list, hasIPs := strings.Cut(spec, "=")
	if !pki.ValidName(name) {
		return component{}, fmt.Errorf("--%s %q: the name must be 1-63 letters, digits, '.', '_' or '-', not starting with punctuation, and not \"ca\"", role, spec)
	}
	c := component{role: role, name: name}
	if hasIPs {
		if role == "admin" {
			return component{}, fmt.Errorf("--admin %q: an admin certificate is only a client's and takes no IP addresses: pass --admin %s", spec, name)
		}
		ips, err := parseIPs("--"+role+" "+name, strings.Split(list, ","))
		if err != nil {
			return component{}, err
		}
		c.ips = ips
	}
	return c, nil
}

func certsClusterCmd() *cobra.Command {
	var (
		agents, admins []string
		arbiter        string
	)
	cmd := &cobra.Command{
		Use:   "cluster DIR --agent NAME[=IP,...] --arbiter NAME[=IP,...] --admin NAME",
		Short: "Create the CA and every certificate of a cluster that DIR lacks, and print their config",
		Long: `Create the CA in DIR unless it has one (an existing CA is never replaced),
then issue a certificate for every named component that has none yet, and
print the configuration lines each component needs. Running it again
issues only what is missing.

Agent names must be their agent_id. Give the arbiter every IP address the
agents dial it at; --agent IPs are for clients that dial an agent by
address (its api_listen).`,
		Example: `  remora certs cluster /etc/remora/pki --agent host-a=10.0.0.1 --agent host-b=10.0.0.2 \
      --arbiter arbiter=10.0.0.9 --admin alice`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			comps, err := clusterComponents(agents, arbiter, admins)
			if err != nil {
				return err
			}
			return runCluster(cmd.OutOrStdout(), args[0], comps)
		},
	}
	cmd.Flags().StringArrayVar(&agents, "agent", nil, "an agent: NAME (its agent_id), optionally =IP,IP... (repeatable)")
	cmd.Flags().StringVar(&arbiter, "arbiter", "", "the arbiter: NAME=IP,IP... with the addresses agents dial")
	cmd.Flags().StringArrayVar(&admins, "admin", nil, "an admin running `remora vm --agent`: NAME (repeatable)")
	return cmd
}

func clusterComponents(agents []string, arbiter string, admins []string) ([]component, error) {
	var specs [][2]string
	for _, a := range agents {
		specs = append(specs, [2]string{"agent", a})
	}
	if arbiter != "" {
		specs = append(specs, [2]string{"arbiter", arbiter})
	}
	for _, a := range admins {
		specs = append(specs, [2]string{"admin", a})
	}
	if len(specs) == 0 {
		return nil, errors.New("nothing to issue: name the components with --agent, --arbiter and --admin (for just a CA: remora certs init DIR)")
	}
	var comps []component
	roles := map[string]string{}
	for _, s := range specs {
		c, err := parseComponent(s[0], s[1])
		if err != nil {
			return nil, err
		}
		if r, dup := roles[c.name]; dup {
			return nil, fmt.Errorf("%s is named twice (--%s and --%s): every component needs a certificate name of its own", c.name, r, c.role)
		}
		roles[c.name] = c.role
		comps = append(comps, c)
	}
	return comps, nil
}

// runCluster creates what DIR lacks and prints every component's config.
func runCluster(w io.Writer, dir string, comps []component) error {
	switch err := pki.InitCA(dir, false); {
	case err == nil:
		fmt.Fprintf(w, "created CA %s\n", filepath.Join(dir, pki.CACertFile))
	case errors.Is(err, pki.ErrCAExists):
		fmt.Fprintf(w, "using the CA in %s\n", dir)
	default:
		return err
	}
	for _, c := range comps {
		if err := ensureComponent(w, dir, c); err != nil {
			return err
		}
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\nCopy %s and each component's own .crt and .key to its host at the same path\n", pki.CACertFile)
	fmt.Fprintf(w, "(%s stays in %s: nothing else needs it), and add to its config:\n", pki.CAKeyFile, dir)
	for _, c := range comps {
		fmt.Fprintln(w)
		printComponentConfig(w, abs, c)
	}
	return nil
}

// ensureComponent issues c's certificate unless DIR has one; an existing
// one is kept, whatever it holds, so running cluster again is harmless.
func ensureComponent(w io.Writer, dir string, c component) error {
	certPath, keyPath := pki.CertPath(dir, c.name), pki.KeyPath(dir, c.name)
	cert, err := pki.ReadCert(certPath)
	switch {
	case err == nil && fileExists(keyPath):
		fmt.Fprintf(w, "kept %s (%s): %s exists (expires %s)\n", c.name, c.role, certPath, cert.NotAfter.UTC().Format(time.DateOnly))
		if len(c.ips) > 0 && !sameIPs(cert.IPAddresses, c.ips) {
			fmt.Fprintf(w, "note: %s has IPs [%s], not [%s]; to change them run `remora certs issue %s --dir %s --ip %s` (replaces it)\n",
				certPath, joinIPs(cert.IPAddresses), joinIPs(c.ips), c.name, dir, joinIPs(c.ips))
		}
		return nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%w: move it away, or replace it with `remora certs issue %s --dir %s`", err, c.name, dir)
	}
	// No certificate, or one without its key: either is useless as is.
	if err := pki.Issue(dir, c.name, c.ips...); err != nil {
		return err
	}
	fmt.Fprintf(w, "issued %s (%s): %s, %s", c.name, c.role, certPath, keyPath)
	if len(c.ips) > 0 {
		fmt.Fprintf(w, " (IPs %s)", joinIPs(c.ips))
	}
	fmt.Fprintln(w)
	if c.role == "arbiter" && len(c.ips) == 0 {
		fmt.Fprintf(w, "note: the arbiter's certificate has no IP address, so agents must dial it by the name %s; to dial it by address, reissue it with `remora certs issue %s --dir %s --ip IP`\n", c.name, c.name, dir)
	}
	return nil
}

func printComponentConfig(w io.Writer, dir string, c component) {
	cert, key, ca := pki.CertPath(dir, c.name), pki.KeyPath(dir, c.name), filepath.Join(dir, pki.CACertFile)
	switch c.role {
	case "agent":
		fmt.Fprintf(w, "# %s (agent), in /etc/remora/agent.yaml:\nagent_id: %s\ntls_cert: %s\ntls_key: %s\ntls_ca: %s\n", c.name, c.name, cert, key, ca)
	case "arbiter":
		fmt.Fprintf(w, "# %s (arbiter), in /etc/remora/arbiter.yaml:\ntls:\n  cert: %s\n  key: %s\n  ca: %s\n", c.name, cert, key, ca)
	case "admin":
		fmt.Fprintf(w, "# %s (admin), in the config `remora vm --agent HOST:PORT` reads (--config FILE):\ntls_cert: %s\ntls_key: %s\ntls_ca: %s\n", c.name, cert, key, ca)
	}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func sameIPs(a, b []net.IP) bool {
	return slices.EqualFunc(a, b, func(x, y net.IP) bool { return x.Equal(y) })
}

func joinIPs(ips []net.IP) string {
	s := make([]string, len(ips))
	for i, ip := range ips {
		s[i] = ip.String()
	}
	return strings.Join(s, ",")
}

// certInfo is one row of `certs show`.
type certInfo struct {
	File     string    `json:"file"`
	Name     string    `json:"name"`
	CA       bool      `json:"ca"`
	Names    []string  `json:"names"`
	IPs      []string  `json:"ips"`
	NotAfter time.Time `json:"not_after,omitzero"`
	DaysLeft int       `json:"days_left"`
	Expired  bool      `json:"expired"`
	Warning  string    `json:"warning,omitempty"`
	Error    string    `json:"error,omitempty"` // the file is no readable certificate
}

func certsShowCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show DIR",
		Short: "List the certificates in DIR with their names and expiry; fails if one has expired",
		Long: `List every certificate (*.crt) in DIR: its names, IP addresses, expiry and
days left. Those expiring within 30 days, or expired, are marked WARNING
with the command that renews them. The exit status is non-zero if a
certificate has expired or cannot be read.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			infos, err := readCertInfos(args[0], time.Now())
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(infos); err != nil {
					return err
				}
			} else {
				printCertInfos(cmd.OutOrStdout(), infos)
			}
			return showVerdict(args[0], infos)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// readCertInfos describes every *.crt in dir, the CA first.
func readCertInfos(dir string, now time.Time) ([]certInfo, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("certs show: %w", err)
	}
	var files []string
	for _, e := range entries {
		if !e.IsDir() && strings.HasSuffix(e.Name(), ".crt") && e.Name() != pki.CACertFile {
			files = append(files, e.Name())
		}
	}
	if fileExists(filepath.Join(dir, pki.CACertFile)) {
		files = append([]string{pki.CACertFile}, files...)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no certificates in %s: create them with `remora certs cluster %s --agent NAME ...`", dir, dir)
	}
	infos := make([]certInfo, len(files))
	for i, f := range files {
		infos[i] = certInfoOf(dir, f, now)
	}
	return infos, nil
}

func certInfoOf(dir, file string, now time.Time) certInfo {
	info := certInfo{File: file, Name: strings.TrimSuffix(file, ".crt")}
	cert, err := pki.ReadCert(filepath.Join(dir, file))
	if err != nil {
		info.Error = err.Error()
		return info
	}
	info.CA = cert.IsCA
	info.Names = pki.Names(cert)
	info.IPs = []string{}
	for _, ip := range cert.IPAddresses {
		info.IPs = append(info.IPs, ip.String())
	}
	info.NotAfter = cert.NotAfter.UTC()
	info.DaysLeft = pki.DaysLeft(cert, now)
	info.Expired = pki.Expired(cert, now)
	info.Warning = pki.ExpiryWarningIn(dir, cert, now)
	return info
}

func printCertInfos(w io.Writer, infos []certInfo) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tNAMES\tIPS\tNOT AFTER\tDAYS LEFT\tSTATUS")
	var notes []string
	for _, i := range infos {
		if i.Error != "" {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\tUNREADABLE\n", i.Name)
			notes = append(notes, "ERROR: "+i.Error)
			continue
		}
		mark := "ok"
		if i.Warning != "" {
			mark = "WARNING"
			notes = append(notes, "WARNING: "+i.Warning)
		}
		ips := strings.Join(i.IPs, ",")
		if ips == "" {
			ips = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", i.Name, strings.Join(i.Names, ","), ips, i.NotAfter.Format(time.DateOnly), i.DaysLeft, mark)
	}
	tw.Flush()
	if len(notes) > 0 {
		fmt.Fprintf(w, "\n%s\n", strings.Join(notes, "\n"))
	}
}

// showVerdict fails when a certificate has expired or cannot be read:
// scripts and monitoring act on the exit status.
func showVerdict(dir string, infos []certInfo) error {
	var bad []string
	for _, i := range infos {
		switch {
		case i.Error != "":
			bad = append(bad, i.Name+" (unreadable)")
		case i.Expired:
			bad = append(bad, i.Name+" (expired)")
		}
	}
	if len(bad) == 0 {
		return nil
	}
	return fmt.Errorf("%s in %s: renew each with `remora certs renew %s NAME`", strings.Join(bad, ", "), dir, dir)
}

func certsRenewCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "renew DIR NAME",
		Short: "Reissue NAME with the same names and IPs and a fresh lifetime; keeps NAME.crt.old/NAME.key.old",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir, name := args[0], args[1]
			if err := pki.Renew(dir, name); err != nil {
				return err
			}
			cert, err := pki.ReadCert(pki.CertPath(dir, name))
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "renewed %s: %s now expires %s; the old pair is kept as %s.old and %s.old\n",
				name, pki.CertPath(dir, name), cert.NotAfter.UTC().Format(time.DateOnly), pki.CertPath(dir, name), pki.KeyPath(dir, name))
			fmt.Fprintf(cmd.OutOrStdout(), "copy the new pair to the host of %s and restart it there: certificates are read at start\n", name)
			return nil
		},
	}
}
