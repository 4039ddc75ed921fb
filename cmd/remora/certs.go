package main

import (
	"errors"
	"fmt"
	"net"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/internal/pki"
)

func certsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "certs",
		Short: "Manage the lab CA and component certificates for mutual TLS",
	}
	var force bool
	initCmd := &cobra.Command{
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
	initCmd.Flags().BoolVar(&force, "force", false, "replace an existing CA")

	var (
		dir string
		ips []string
	)
	issueCmd := &cobra.Command{
		Use:   "issue NAME",
		Short: "Issue NAME.crt/NAME.key (server and client auth) from the CA in --dir",
		Long: `Issue a certificate whose CommonName and DNS SAN are NAME. For agents NAME
must be the agent id; for the arbiter, add --ip for each address agents dial.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var parsed []net.IP
			for _, s := range ips {
				ip := net.ParseIP(s)
				if ip == nil {
					return fmt.Errorf("--ip %q is not an IP address", s)
				}
				parsed = append(parsed, ip)
			}
			if err := pki.Issue(dir, args[0], parsed...); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "issued %s and %s\n", pki.CertPath(dir, args[0]), pki.KeyPath(dir, args[0]))
			return nil
		},
	}
	issueCmd.Flags().StringVar(&dir, "dir", "", "PKI directory holding the CA (required)")
	issueCmd.Flags().StringSliceVar(&ips, "ip", nil, "IP SAN (repeatable or comma-separated)")
	issueCmd.MarkFlagRequired("dir")

	cmd.AddCommand(initCmd, issueCmd)
	return cmd
}
