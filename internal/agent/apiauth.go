package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"

	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/pki"
	"github.com/remora-ha/remora/internal/unixsock"
)

// The admin API can fail guests over and unenroll them, so both of its
// doors check who knocks: the unix socket takes root and members of
// api_group (its file mode says so, and the peer's credentials are checked
// again per connection, so a chmod or a copied socket opens nothing), the
// TCP listener takes the certificate names in api_admins.

// apiGroupID resolves api_group; -1 if unset.
func apiGroupID(cfg api.Config) (int, error) {
	if cfg.APIGroup == "" {
		return -1, nil
	}
	g, err := user.LookupGroup(cfg.APIGroup)
	if err != nil {
		return -1, fmt.Errorf("api_group %q: %v: create the group (groupadd %s) or remove api_group", cfg.APIGroup, err, cfg.APIGroup)
	}
	return strconv.Atoi(g.Gid)
}

type credKey struct{}

// connCred remembers a unix-socket peer's credentials for its requests.
func connCred(ctx context.Context, c net.Conn) context.Context {
	if uc, ok := c.(*net.UnixConn); ok {
		if cr, err := unixsock.PeerCred(uc); err == nil {
			return context.WithValue(ctx, credKey{}, cr)
		}
	}
	return ctx
}

// localAdmin reports whether a unix-socket peer may use the API.
func localAdmin(cr unixsock.Cred, gid int) bool {
	if cr.UID == 0 {
		return true
	}
	if gid < 0 {
		return false
	}
	if cr.GID == gid {
		return true
	}
	return slices.Contains(processGroups(cr), gid)
}

// processGroups are the supplementary groups of the peer process (what
// the kernel checked against the socket's mode), or, if it is gone, its
// user's.
func processGroups(cr unixsock.Cred) []int {
	var out []int
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cr.PID)); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "Groups:"); ok {
				for _, f := range strings.Fields(rest) {
					if n, err := strconv.Atoi(f); err == nil {
						out = append(out, n)
					}
				}
				return out
			}
		}
	}
	if u, err := user.LookupId(strconv.Itoa(cr.UID)); err == nil {
		ids, _ := u.GroupIds()
		for _, s := range ids {
			if n, err := strconv.Atoi(s); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

// authorize wraps the API's handler with the check of its door.
func (a *Agent) authorize(mux http.Handler, overTCP bool, gid int) http.Handler {
	if overTCP {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var who []string
			if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
				who = pki.Names(r.TLS.PeerCertificates[0])
			}
			if len(who) == 0 {
				a.log.Warn("admin API request without a client certificate refused", "peer", r.RemoteAddr)
				writeJSON(w, http.StatusUnauthorized, api.Error{Error: "a client certificate signed by the agent's CA is required"})
				return
			}
			if !slices.ContainsFunc(who, func(n string) bool { return slices.Contains(a.cfg.APIAdmins, n) }) {
				a.log.Warn("admin API request refused: certificate not in api_admins", "client", who, "peer", r.RemoteAddr, "call", r.Method+" "+r.URL.Path)
				writeJSON(w, http.StatusForbidden, api.Error{Error: fmt.Sprintf("certificate %v is not one of this agent's api_admins %v: use an admin certificate (`remora certs issue NAME --dir DIR`, or `remora certs cluster ... --admin NAME`) and add NAME to api_admins", who, a.cfg.APIAdmins)})
				return
			}
			if r.Method != http.MethodGet {
				a.log.Info("admin API", "client", who, "peer", r.RemoteAddr, "call", r.Method+" "+r.URL.Path)
			}
			mux.ServeHTTP(w, r)
		})
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cr, ok := r.Context().Value(credKey{}).(unixsock.Cred)
		if !ok || !localAdmin(cr, gid) {
			a.log.Warn("admin socket request refused", "uid", cr.UID, "pid", cr.PID, "call", r.Method+" "+r.URL.Path)
			msg := fmt.Sprintf("uid %d may not use this agent's admin socket: run as root", cr.UID)
			if a.cfg.APIGroup != "" {
				msg += fmt.Sprintf(" or as a member of api_group %q", a.cfg.APIGroup)
			} else {
				msg += ", or set api_group to a group of admins"
			}
			writeJSON(w, http.StatusForbidden, api.Error{Error: msg})
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// listenAPI opens the admin socket: 0600 root's, or 0660 with api_group.
func listenAPI(path string, gid int) (net.Listener, error) {
	mode := os.FileMode(0o600)
	if gid >= 0 {
		mode = 0o660
	}
	ln, err := unixsock.Listen(path, mode)
	if err != nil {
		if errors.Is(err, unixsock.ErrInUse) {
			return nil, fmt.Errorf("another agent is serving %s: stop it first, or set api_socket", path)
		}
		return nil, err
	}
	if gid >= 0 {
		if err := os.Chown(path, 0, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("give the admin socket %s to api_group: %w", path, err)
		}
	}
	return ln, nil
}
