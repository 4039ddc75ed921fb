package main

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/internal/pki"
)

// arbiterSource is what the arbiter's metrics are read from.
type arbiterSource interface {
	Status() arbiter.Status
	RequestCounts() map[arbiter.RequestKey]uint64
}

// arbiterCollector computes the arbiter's metrics at each scrape from its
// status and request counts.
type arbiterCollector struct {
	src   arbiterSource
	certs map[string]string // certificate role -> PEM file

	requests, fence, inSync, lease, probeOK, probeFailures *prometheus.Desc
	heartbeatAge, suspected, certExp                       *prometheus.Desc
}

func newArbiterCollector(src arbiterSource, certs map[string]string) *arbiterCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("remora_arbiter_"+name, help, labels, nil)
	}
	return &arbiterCollector{
		src: src, certs: certs,
		requests:      d("requests_total", "Requests answered, by operation and result (ok or the error code): promotions granted and refused among them.", "op", "result"),
		fence:         d("guest_fencing_epoch", "The guest's current fencing epoch.", "guest", "primary"),
		inSync:        d("guest_in_sync", "1 if the guest's standby counts as in sync (it may be promoted).", "guest"),
		lease:         d("guest_lease_remaining_seconds", "The primary's lease left, on the arbiter's clock.", "guest"),
		probeOK:       d("guest_probe_ok", "1 if the last client-side probe of the guest's service answered.", "guest"),
		probeFailures: d("guest_probe_consecutive_failures", "Probes of the guest's service failed in a row.", "guest"),
		heartbeatAge:  d("agent_heartbeat_age_seconds", "Time since the agent's last heartbeat.", "agent"),
		suspected:     d("agent_suspected", "1 if the arbiter's failure detector suspects the agent.", "agent"),
		certExp:       prometheus.NewDesc("remora_certificate_expiry_timestamp_seconds", "When a certificate the arbiter uses expires (Unix time).", []string{"cert"}, prometheus.Labels{"agent": "arbiter"}),
	}
}

func (c *arbiterCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.requests, c.fence, c.inSync, c.lease, c.probeOK, c.probeFailures, c.heartbeatAge, c.suspected, c.certExp} {
		ch <- d
	}
}

func (c *arbiterCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for k, n := range c.src.RequestCounts() {
		ch <- prometheus.MustNewConstMetric(c.requests, prometheus.CounterValue, float64(n), k.Op, k.Result)
	}
	st := c.src.Status()
	for _, g := range st.Guests {
		if g.Retired || g.Recovering != nil {
			continue
		}
		gauge(c.fence, float64(g.Epoch), g.Guest, g.Primary)
		gauge(c.inSync, oneIf(g.InSync), g.Guest)
		gauge(c.lease, max(g.LeaseRemaining, 0).Seconds(), g.Guest)
		if p := g.Service; p != nil && !p.At.IsZero() {
			gauge(c.probeOK, oneIf(p.OK), g.Guest)
			gauge(c.probeFailures, float64(p.ConsecutiveFailures), g.Guest)
		}
	}
	for _, a := range st.Agents {
		if !a.LastHeartbeat.IsZero() {
			gauge(c.heartbeatAge, st.Now.Sub(a.LastHeartbeat).Seconds(), a.Agent)
		}
		gauge(c.suspected, oneIf(a.HeartbeatSuspected), a.Agent)
	}
	for role, path := range c.certs {
		if cert, err := pki.ReadCert(path); err == nil {
			gauge(c.certExp, float64(cert.NotAfter.Unix()), role)
		}
	}
}

func oneIf(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// serveArbiterMetrics serves /metrics on l until ctx ends; a failure is
// logged: deciding promotions does not depend on monitoring.
func serveArbiterMetrics(ctx context.Context, l net.Listener, src arbiterSource, certs map[string]string, log *slog.Logger) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newArbiterCollector(src, certs), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	log.Info("arbiter: serving metrics", "addr", l.Addr().String(), "path", "/metrics")
	if err := srv.Serve(l); err != nil && ctx.Err() == nil {
		log.Error("arbiter: metrics server stopped", "err", err)
	}
}
