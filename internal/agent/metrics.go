package agent

import (
	"context"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/pki"
)

// metricsCollector turns the guests' status, the same figures `vm status`
// shows, into Prometheus metrics at each scrape: nothing on the
// checkpoint path pays for them.
type metricsCollector struct {
	agent  string
	status func() []api.VMStatus
	certs  map[string]string // certificate role -> PEM file

	state, protected, fence, epoch, acked, epochsPerSec           *prometheus.Desc
	pause, pauseMax, dirty, dirtyTotal, incremental               *prometheus.Desc
	bytes, rawBytes, lag, lease, held, heldFrames                 *prometheus.Desc
	dropped, triggered, devWire, diskResyncs, failedOver, certExp *prometheus.Desc
}

func newMetricsCollector(agent string, status func() []api.VMStatus, certs map[string]string) *metricsCollector {
	g := []string{"guest", "role"}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("remora_"+name, help, labels, prometheus.Labels{"agent": agent})
	}
	return &metricsCollector{
		agent: agent, status: status, certs: certs,
		state:        d("guest_state", "1 for the guest's current replication state.", append(g, "state")...),
		protected:    d("guest_protected", "1 if the guest (as primary) is protected: its standby holds a recent epoch.", g...),
		fence:        d("guest_fencing_epoch", "The fencing epoch this copy runs at.", g...),
		epoch:        d("guest_epoch", "The newest checkpoint epoch captured (primary) or committed (standby).", g...),
		acked:        d("guest_acked_epoch", "The newest epoch the standby acknowledged.", g...),
		epochsPerSec: d("guest_epochs_per_second", "Checkpoints per second, recently.", g...),
		pause:        d("guest_pause_seconds", "Guest pause per checkpoint, recent quantiles.", append(g, "quantile")...),
		pauseMax:     d("guest_pause_max_seconds", "The longest incremental pause since the agent started.", g...),
		dirty:        d("guest_dirty_pages", "Pages dirtied in the last epoch.", g...),
		dirtyTotal:   d("guest_dirty_pages_total", "Pages sent in incremental epochs.", g...),
		incremental:  d("guest_epochs_total", "Incremental epochs captured.", g...),
		bytes:        d("guest_replication_bytes_total", "Bytes sent (primary) or received (standby) for the guest.", g...),
		rawBytes:     d("guest_replication_raw_bytes_total", "Bytes before compression (primary).", g...),
		lag:          d("guest_lag_seconds", "How far the standby is behind: age of the oldest unacknowledged epoch.", g...),
		lease:        d("guest_lease_remaining_seconds", "The arbiter lease left, on this agent's clock.", g...),
		held:         d("guest_output_held_bytes", "Guest network output held until its epoch is acknowledged.", g...),
		heldFrames:   d("guest_output_held_frames", "Frames held.", g...),
		dropped:      d("guest_output_dropped_frames_total", "Frames dropped because the output buffer was full.", g...),
		triggered:    d("guest_output_triggered_epochs_total", "Epochs started early because the guest had output held.", g...),
		devWire:      d("guest_devstate_wire_bytes", "The last epoch's device state on the wire (a delta, compressed).", g...),
		diskResyncs:  d("guest_disk_resyncs_total", "Full disk copies to the standby since the agent started.", g...),
		failedOver:   d("guest_failover_timestamp_seconds", "When the guest last failed over to this agent and ran here (Unix time); absent if it never did since the agent started.", g...),
		certExp:      d("certificate_expiry_timestamp_seconds", "When a certificate this agent uses expires (Unix time).", "cert"),
	}
}

func (c *metricsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.state, c.protected, c.fence, c.epoch, c.acked, c.epochsPerSec,
		c.pause, c.pauseMax, c.dirty, c.dirtyTotal, c.incremental, c.bytes, c.rawBytes, c.lag, c.lease,
		c.held, c.heldFrames, c.dropped, c.triggered, c.devWire, c.diskResyncs, c.failedOver, c.certExp} {
		ch <- d
	}
}

func (c *metricsCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	for _, v := range c.status() {
		l := []string{v.Guest, v.Role}
		gauge(c.state, 1, v.Guest, v.Role, v.State)
		if v.Role == api.RolePrimary {
			gauge(c.protected, oneIf(v.State == checkpoint.StateProtected), l...)
		}
		gauge(c.fence, float64(v.Fence), l...)
		gauge(c.epoch, float64(v.Epoch), l...)
		gauge(c.acked, float64(v.AckedEpoch), l...)
		gauge(c.epochsPerSec, v.EpochsPerSec, l...)
		gauge(c.pause, v.PauseP50.Seconds(), v.Guest, v.Role, "0.5")
		gauge(c.pause, v.PauseP99.Seconds(), v.Guest, v.Role, "0.99")
		gauge(c.pauseMax, v.PauseMax.Seconds(), l...)
		gauge(c.dirty, float64(v.DirtyPages), l...)
		counter(c.dirtyTotal, float64(v.DirtyTotal), l...)
		counter(c.incremental, float64(v.Incremental), l...)
		counter(c.bytes, float64(v.Bytes), l...)
		counter(c.rawBytes, float64(v.RawBytes), l...)
		gauge(c.lag, v.Lag.Seconds(), l...)
		gauge(c.lease, v.LeaseValid.Seconds(), l...)
		gauge(c.devWire, float64(v.DevStateWire), l...)
		counter(c.triggered, float64(v.OutputTriggered), l...)
		if o := v.Output; o != nil {
			gauge(c.held, float64(o.HeldBytes), l...)
			gauge(c.heldFrames, float64(o.HeldFrames), l...)
			counter(c.dropped, float64(o.DroppedFrames), l...)
		}
		if d := v.Disk; d != nil {
			counter(c.diskResyncs, float64(d.Resyncs), l...)
		}
		if !v.RestoredAt.IsZero() {
			gauge(c.failedOver, float64(v.RestoredAt.UnixMilli())/1e3, l...)
		}
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

// metricsHandler serves this agent's metrics and the Go runtime's.
func (a *Agent) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	certs := map[string]string{}
	if a.cfg.TLSCert != "" {
		certs["agent"], certs["ca"] = a.cfg.TLSCert, a.cfg.TLSCA
	}
	reg.MustRegister(newMetricsCollector(a.cfg.AgentID, a.Status, certs),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}

// serveMetrics serves /metrics until ctx ends; a failure is logged, not
// fatal: protection does not depend on monitoring.
func (a *Agent) serveMetrics(ctx context.Context, l net.Listener) {
	srv := &http.Server{Handler: a.metricsHandler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	a.log.Info("serving metrics", "addr", l.Addr().String(), "path", "/metrics")
	if err := srv.Serve(l); err != nil && ctx.Err() == nil {
		a.log.Error("metrics server stopped", "err", err)
	}
}
