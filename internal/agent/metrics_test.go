package agent

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/promcheck"
)

// scrape serves the collector over HTTP and parses what a Prometheus
// server would read.
func scrape(t *testing.T, c prometheus.Collector) map[string]*dto.MetricFamily {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("the Prometheus text parser refuses the page: %v", err)
	}
	return fams
}

// value is the sample of family name whose labels include want.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	t.Helper()
	f, ok := fams[name]
	if !ok {
		t.Fatalf("no %s", name)
	}
next:
	for _, m := range f.Metric {
		labels := map[string]string{}
		for _, l := range m.Label {
			labels[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if labels[k] != v {
				continue next
			}
		}
		switch {
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Counter != nil:
			return m.Counter.GetValue()
		}
	}
	t.Fatalf("no %s with %v", name, want)
	return 0
}

// The metrics say what `vm status` says, under conventional names and
// base units, for a primary and a standby.
func TestMetricsMatchStatus(t *testing.T) {
	st := []api.VMStatus{
		{Guest: "web1", Role: api.RolePrimary, State: checkpoint.StateProtected, Fence: 7, Epoch: 120, AckedEpoch: 118,
			EpochsPerSec: 9.5, PauseP50: 35 * time.Millisecond, PauseP99: 80 * time.Millisecond, DirtyPages: 77, DirtyTotal: 9000,
			Incremental: 119, Bytes: 1 << 20, RawBytes: 4 << 20, Lag: 150 * time.Millisecond, LeaseValid: 2 * time.Second,
			OutputTriggered: 40, Output: &api.OutputStatus{HeldBytes: 3000, HeldFrames: 4, DroppedFrames: 1}, Disk: &api.DiskStatus{Resyncs: 2}},
		{Guest: "db1", Role: api.RoleStandby, State: "replica", Fence: 3, Epoch: 55, RestoredAt: time.UnixMilli(1_700_000_000_500)},
		{Guest: "lost", Role: api.RolePrimary, State: checkpoint.StateDegraded, Fence: 2},
	}
	fams := scrape(t, newMetricsCollector("host-a", func() []api.VMStatus { return st }, nil))
	web := map[string]string{"guest": "web1", "role": "primary", "agent": "host-a"}
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"remora_guest_protected", web, 1},
		{"remora_guest_protected", map[string]string{"guest": "lost"}, 0},
		{"remora_guest_state", map[string]string{"guest": "db1", "role": "standby", "state": "replica"}, 1},
		{"remora_guest_fencing_epoch", web, 7},
		{"remora_guest_epoch", web, 120},
		{"remora_guest_epoch", map[string]string{"guest": "db1"}, 55},
		{"remora_guest_acked_epoch", web, 118},
		{"remora_guest_pause_seconds", map[string]string{"guest": "web1", "quantile": "0.5"}, 0.035},
		{"remora_guest_pause_seconds", map[string]string{"guest": "web1", "quantile": "0.99"}, 0.08},
		{"remora_guest_dirty_pages_total", web, 9000},
		{"remora_guest_epochs_total", web, 119},
		{"remora_guest_replication_bytes_total", web, 1 << 20},
		{"remora_guest_lag_seconds", web, 0.15},
		{"remora_guest_lease_remaining_seconds", web, 2},
		{"remora_guest_output_held_bytes", web, 3000},
		{"remora_guest_output_dropped_frames_total", web, 1},
		{"remora_guest_output_triggered_epochs_total", web, 40},
		{"remora_guest_disk_resyncs_total", web, 2},
		{"remora_guest_failover_timestamp_seconds", map[string]string{"guest": "db1"}, 1_700_000_000.5},
	} {
		if got := value(t, fams, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if _, ok := fams["remora_guest_protected"]; ok {
		for _, m := range fams["remora_guest_protected"].Metric {
			for _, l := range m.Label {
				if l.GetName() == "role" && l.GetValue() == "standby" {
					t.Error("a standby's replica has a primary's protected metric")
				}
			}
		}
	}
	for _, m := range fams["remora_guest_failover_timestamp_seconds"].GetMetric() {
		for _, l := range m.Label {
			if l.GetName() == "guest" && l.GetValue() != "db1" {
				t.Errorf("guest %s never failed over, yet has a failover time", l.GetValue())
			}
		}
	}
	if f := fams["remora_guest_epochs_total"]; f.GetType() != dto.MetricType_COUNTER {
		t.Errorf("remora_guest_epochs_total is a %v", f.GetType())
	}
}

// The certificate expiry is the certificate's NotAfter; a missing file
// is left out rather than reported as expired.
func TestMetricsCertificateExpiry(t *testing.T) {
	dir := t.TempDir()
	certPath := writeTestCert(t, dir, time.Date(2031, 5, 1, 0, 0, 0, 0, time.UTC))
	fams := scrape(t, newMetricsCollector("host-a", func() []api.VMStatus { return nil },
		map[string]string{"agent": certPath, "ca": dir + "/missing.crt"}))
	if got := value(t, fams, "remora_certificate_expiry_timestamp_seconds", map[string]string{"cert": "agent"}); got != float64(time.Date(2031, 5, 1, 0, 0, 0, 0, time.UTC).Unix()) {
		t.Fatalf("expiry %v", got)
	}
	for _, m := range fams["remora_certificate_expiry_timestamp_seconds"].Metric {
		for _, l := range m.Label {
			if strings.Contains(l.GetValue(), "ca") {
				t.Fatal("a missing certificate is reported")
			}
		}
	}
}

// writeTestCert writes a self-signed certificate expiring at notAfter.
func writeTestCert(t *testing.T, dir string, notAfter time.Time) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "host-a"},
		NotBefore: notAfter.Add(-time.Hour), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "host-a.crt")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// Every agent metric the example alert rules and dashboard use is one the
// agent serves.
func TestAlertRulesUseServedMetrics(t *testing.T) {
	missing, err := promcheck.Unserved(newMetricsCollector("a", nil, nil), promcheck.Files, func(m string) bool {
		return !strings.HasPrefix(m, "remora_arbiter_") // the arbiter's: checked in cmd/remora
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range missing {
		t.Errorf("alert rules use %s, which the agent does not serve", m)
	}
}
