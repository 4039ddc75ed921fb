package migrate

import (
	"strings"
	"testing"
)

func TestInterfaceTap(t *testing.T) {
	x := `<domain><devices>
  <interface type='bridge'><source bridge='br0'/><target dev='vnet7'/><alias name='net0'/></interface>
  <interface type='user'><alias name='net1'/></interface>
</devices></domain>`
	if tap, err := InterfaceTap(x, "hostnet0"); err != nil || tap != "vnet7" {
		t.Fatalf("hostnet0: %q, %v", tap, err)
	}
	for netdev, want := range map[string]string{
		"hostnet1": "has no host tap device",
		"hostnet2": "no interface with alias \"net2\" (interfaces: net0, net1)",
		"mynet":    "not one libvirt named",
	} {
		if _, err := InterfaceTap(x, netdev); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want %q", netdev, err, want)
		}
	}
	if _, err := InterfaceTap("<domain", "hostnet0"); err == nil {
		t.Error("malformed XML accepted")
	}
}
