package e2e

import (
	"context"
	"fmt"
	"net/http"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/remora-ha/remora/checkpoint"
)

// metricsPort is where every e2e agent serves /metrics (on its own IP).
const metricsPort = 9400

// scrapeMetrics reads an agent's /metrics with the Prometheus text parser.
func scrapeMetrics(t *testing.T, h *host) map[string]*dto.MetricFamily {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://%s:%d/metrics", hostIP(h), metricsPort), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scrape %s: %v", h.name, err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("scrape %s: the Prometheus text parser refuses it: %v", h.name, err)
	}
	return fams
}

// sample is the value of family name for guest (role too, if set).
func sample(fams map[string]*dto.MetricFamily, name, guest, role string) (float64, bool) {
	for _, m := range fams[name].GetMetric() {
		ok := true
		for _, l := range m.Label {
			if (l.GetName() == "guest" && l.GetValue() != guest) || (role != "" && l.GetName() == "role" && l.GetValue() != role) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		if m.Gauge != nil {
			return m.Gauge.GetValue(), true
		}
		return m.Counter.GetValue(), true
	}
	return 0, false
}

// The agents' /metrics agree with `vm status` on a real protected guest,
// and follow it when the standby dies (the negative control: the
// protected gauge drops to 0).
func TestMetricsScrape(t *testing.T) {
	needLab(t)
	l := newArbLab(t)
	name := "e2e-metrics"
	g := bootGuest(t, name, 20, 2000)
	l.startArbiter()
	l.a.start()
	l.b.start()
	l.enroll(t, g)

	before, _ := l.a.status(name)
	prim := scrapeMetrics(t, l.a)
	after, _ := l.a.status(name)
	get := func(fams map[string]*dto.MetricFamily, metric, role string) float64 {
		t.Helper()
		v, ok := sample(fams, metric, name, role)
		if !ok {
			t.Fatalf("no %s for %s (%s)", metric, name, role)
		}
		return v
	}
	if v := get(prim, "remora_guest_protected", "primary"); v != 1 {
		t.Errorf("protected %v while vm status says %s", v, after.State)
	}
	if v := get(prim, "remora_guest_fencing_epoch", "primary"); v != float64(after.Fence) {
		t.Errorf("fencing epoch %v, vm status %d", v, after.Fence)
	}
	if v := get(prim, "remora_guest_epoch", "primary"); v < float64(before.Epoch) || v > float64(after.Epoch) {
		t.Errorf("epoch %v, vm status %d..%d", v, before.Epoch, after.Epoch)
	}
	if v := get(prim, "remora_guest_lease_remaining_seconds", "primary"); v <= 0 || v > 10 {
		t.Errorf("lease remaining %vs", v)
	}
	if v := get(prim, "remora_certificate_expiry_timestamp_seconds", ""); time.Unix(int64(v), 0).Before(time.Now()) {
		t.Errorf("certificate expiry %v is in the past", v)
	}
	sb := scrapeMetrics(t, l.b)
	if v := get(sb, "remora_guest_epoch", "standby"); v < 1 {
		t.Errorf("standby epoch %v", v)
	}

	l.b.stop(syscall.SIGKILL)
	waitFor(t, "the primary to lose its standby", time.Minute, func() bool {
		s, ok := l.a.status(name)
		return ok && s.State != checkpoint.StateProtected
	})
	if v := get(scrapeMetrics(t, l.a), "remora_guest_protected", "primary"); v != 0 {
		t.Errorf("protected %v with the standby dead", v)
	}
}
