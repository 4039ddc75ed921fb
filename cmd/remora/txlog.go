package main

// The "txlog" subcommands inspect a transaction log directory without
// modifying it.

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"unicode"
	"unicode/utf8"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/txlog"
)

// newTxlogCmd returns the "txlog" command with its dump and verify
// subcommands.
func newTxlogCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "txlog",
		Short: "Inspect and check a transaction log directory (read-only)",
	}
	cmd.AddCommand(dumpCommand(), verifyCommand())
	return cmd
}

// readOnly opens dir without locking or repairing it, so both commands are
// safe to run next to a live writer or on evidence of a failure.
func readOnly(dir string, verifyAll bool) (*txlog.Log, txlog.Recovery, error) {
	return txlog.Open(dir, txlog.Options{ReadOnly: true, VerifyAll: verifyAll})
}

func warnTorn(w io.Writer, t *txlog.TornTail) {
	if t == nil {
		return
	}
	fmt.Fprintf(w, "warning: torn tail in %s at offset %d: %d bytes after LSN %d are not a valid record (%s); "+
		"the next writable open cuts them and saves them next to the segment\n",
		t.Segment, t.Offset, t.Bytes, t.AfterLSN, t.Reason)
}

func dumpCommand() *cobra.Command {
	var asJSON bool
	var from uint64
	var limit, preview int
	cmd := &cobra.Command{
		Use:   "dump DIR",
		Short: "Print the records of a transaction log",
		Long: "Print one line per record: LSN, type, fencing epoch, transaction id, payload length\n" +
			"and a short preview (text if printable, hex otherwise). With --json, print one JSON\n" +
			"object per line. The directory is opened read-only.",
		Args:          cobra.ExactArgs(1),
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			l, rec, err := readOnly(args[0], false)
			if err != nil {
				return err
			}
			defer l.Close()
			warnTorn(cmd.ErrOrStderr(), rec.Torn)
			out := cmd.OutOrStdout()
			var tw *tabwriter.Writer
			var enc *json.Encoder
			if asJSON {
				enc = json.NewEncoder(out)
			} else {
				tw = tabwriter.NewWriter(out, 0, 8, 2, ' ', 0)
				fmt.Fprintln(tw, "LSN\tTYPE\tEPOCH\tTXID\tLEN\tPREVIEW")
			}
			n := 0
			err = l.Iterate(txlog.LSN(from), func(r txlog.Record) error {
				if limit > 0 && n >= limit {
					return errStop
				}
				n++
				if asJSON {
					return enc.Encode(jsonRecord(r, preview))
				}
				_, err := fmt.Fprintf(tw, "%d\t%v\t%d\t%d\t%d\t%s\n", r.LSN, r.Type, r.Epoch, r.TxID, len(r.Payload), textPreview(r, preview))
				return err
			})
			if tw != nil {
				tw.Flush()
			}
			if err == errStop {
				err = nil
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object per record")
	cmd.Flags().Uint64Var(&from, "from", 0, "first LSN to print (default: oldest on disk)")
	cmd.Flags().IntVar(&limit, "limit", 0, "print at most this many records (0: all)")
	cmd.Flags().IntVar(&preview, "preview", 32, "payload bytes shown in the preview")
	return cmd
}

var errStop = errors.New("stop")

type dumpRecord struct {
	LSN        uint64     `json:"lsn"`
	Type       string     `json:"type"`
	Epoch      uint64     `json:"epoch"`
	TxID       uint64     `json:"txid"`
	Len        int        `json:"len"`
	Preview    string     `json:"preview,omitempty"`
	PreviewHex string     `json:"preview_hex,omitempty"`
	Live       []liveJSON `json:"live,omitempty"` // checkpoints only
}

type liveJSON struct {
	TxID     uint64 `json:"txid"`
	State    string `json:"state"`
	FirstLSN uint64 `json:"first_lsn"`
}

func jsonRecord(r txlog.Record, n int) dumpRecord {
	d := dumpRecord{LSN: uint64(r.LSN), Type: r.Type.String(), Epoch: r.Epoch, TxID: r.TxID, Len: len(r.Payload)}
	p := r.Payload
	if c, err := txlog.DecodeCheckpoint(r); err == nil {
		p = c.Data
		for _, t := range c.Live {
			d.Live = append(d.Live, liveJSON{TxID: t.ID, State: t.State.String(), FirstLSN: uint64(t.FirstLSN)})
		}
	}
	p = p[:min(len(p), n)]
	if printable(p) {
		d.Preview = string(p)
	} else {
		d.PreviewHex = hex.EncodeToString(p)
	}
	return d
}

func textPreview(r txlog.Record, n int) string {
	p, prefix := r.Payload, ""
	if c, err := txlog.DecodeCheckpoint(r); err == nil {
		p, prefix = c.Data, fmt.Sprintf("live=%d data=%dB ", len(c.Live), len(c.Data))
	}
	more := ""
	if len(p) > n {
		p, more = p[:n], "..."
	}
	if len(p) == 0 {
		return strings.TrimSpace(prefix)
	}
	if printable(p) {
		return prefix + fmt.Sprintf("%q", p) + more
	}
	return prefix + "0x" + hex.EncodeToString(p) + more
}

func printable(p []byte) bool {
	if !utf8.Valid(p) {
		return false
	}
	for _, r := range string(p) {
		if !unicode.IsPrint(r) && r != ' ' {
			return false
		}
	}
	return true
}

func verifyCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "verify DIR",
		Short: "Check a transaction log without modifying it",
		Long: "Read and checksum every segment and record of the log in DIR without changing it.\n" +
			"Exit status 0: the log is sound (a torn tail, i.e. an unacknowledged last write, is\n" +
			"only a warning). Non-zero: the log is damaged; the message names the segment file\n" +
			"and byte offset.",
		Args:          cobra.ExactArgs(1),
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			dir := args[0]
			l, rec, err := readOnly(dir, true)
			if err != nil {
				return fmt.Errorf("verify %s: %w", dir, err)
			}
			defer l.Close()
			// VerifyAll made recovery checksum every segment and check LSN
			// continuity, so there is nothing left to read.
			warnTorn(cmd.ErrOrStderr(), rec.Torn)
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "%s: sound\n", dir)
			fmt.Fprintf(out, "  segments:     %d\n", rec.Segments)
			if rec.LastLSN >= rec.FirstLSN {
				fmt.Fprintf(out, "  records:      LSN %d..%d (%d checksummed)\n", rec.FirstLSN, rec.LastLSN, rec.ScannedRecords)
			} else {
				fmt.Fprintf(out, "  records:      none (next LSN %d)\n", rec.FirstLSN)
			}
			if c := rec.Checkpoint; c != nil {
				fmt.Fprintf(out, "  checkpoint:   LSN %d, %d live transactions, %d bytes of data\n", c.LSN, len(c.Live), len(c.Data))
			} else {
				fmt.Fprintf(out, "  checkpoint:   none\n")
			}
			var committed, aborted, presumed, inDoubt int
			for _, t := range rec.Txns {
				switch t.State {
				case txlog.TxnCommitted:
					committed++
				case txlog.TxnAborted:
					aborted++
					if t.Presumed {
						presumed++
					}
				case txlog.TxnInDoubt:
					inDoubt++
				}
			}
			fmt.Fprintf(out, "  transactions: %d committed, %d aborted (%d presumed), %d in doubt\n", committed, aborted, presumed, inDoubt)
			fmt.Fprintf(out, "  epoch:        %d\n", rec.MaxEpoch)
			if rec.Torn != nil {
				fmt.Fprintf(out, "  torn tail:    %d bytes in %s at offset %d\n", rec.Torn.Bytes, filepath.Base(rec.Torn.Segment), rec.Torn.Offset)
			}
			return nil
		},
	}
}
