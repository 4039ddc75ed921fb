// Package promcheck checks the monitoring files the repo ships (alert
// rules, dashboards) against the metrics a collector really serves, so a
// renamed metric cannot leave an alert that never fires.
package promcheck

import (
	"fmt"
	"os"
	"regexp"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
)

// Files are the shipped monitoring files, relative to a package two
// levels below the repository root (as tests run).
var Files = []string{"../../configs/prometheus/remora-alerts.yml", "../../configs/grafana/remora-dashboard.json"}

var (
	fqName = regexp.MustCompile(`fqName: "([a-z_]+)"`)
	metric = regexp.MustCompile(`remora_[a-z_]+`)
)

// Unserved returns the metric names the files use, among those mine
// selects, that c does not serve. It fails if the files use none of them.
func Unserved(c prometheus.Collector, files []string, mine func(name string) bool) ([]string, error) {
	served := map[string]bool{}
	ch := make(chan *prometheus.Desc, 64)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			served[m[1]] = true
		}
	}
	var used, missing []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		for _, m := range metric.FindAllString(string(b), -1) {
			if mine(m) {
				used = append(used, m)
				if !served[m] && !slices.Contains(missing, m) {
					missing = append(missing, m)
				}
			}
		}
	}
	if len(used) == 0 {
		return nil, fmt.Errorf("%v use none of these metrics", files)
	}
	return missing, nil
}
