#!/usr/bin/env bash
# Provisions one node of the Vagrant lab (run by `vagrant up` as root):
#   provision.sh ROLE MGMT_IP GUEST_NET_IP PRIMARY_IP STANDBY_IP ARBITER_IP
# ROLE is primary, standby or arbiter (also the node's agent name and
# certificate). Running it again converges: nothing is installed twice and
# the service is restarted with the config written here.
#
# The remora package: out/remora_*.deb from the synced tree if there is one
# (`make deb` on the Vagrant host; a release), else built here from source
# with the Go toolchain go.mod names, fetched from the Go module proxy
# (Debian 12's golang-go is 1.19). REMORA_BUILD=1 always builds.
set -euo pipefail
role=$1 mgmt_ip=$2 guest_ip=$3 primary=$4 standby=$5 arbiter=$6
src=/remora
pki=$src/vagrant/.pki
export DEBIAN_FRONTEND=noninteractive
say() { printf '==> [%s] %s\n' "$role" "$*"; }
die() { printf 'provision [%s]: %s\n' "$role" "$*" >&2; exit 1; }
[ -f "$pki/ca.crt" ] && [ -f "$pki/$role.crt" ] ||
	die "no lab PKI in $pki: the Vagrantfile makes it on the host (vagrant/.pki); run vagrant from the vagrant directory"

# CA certificates the host trusts besides the public ones
# (REMORA_VAGRANT_EXTRA_CA): a network that intercepts TLS, a local mirror.
if [ -n "${EXTRA_CA:-}" ] && [ -f "$EXTRA_CA" ] && ! cmp -s "$EXTRA_CA" /usr/local/share/ca-certificates/remora-lab-extra.crt; then
	say "trusting the extra CA certificates from the host"
	install -m 0644 "$EXTRA_CA" /usr/local/share/ca-certificates/remora-lab-extra.crt
	update-ca-certificates >/dev/null 2>&1 # rehash warns of multi-certificate files; the bundle has them
fi

# The guests' network: primary and standby bridge their guests onto it
# (rmbr0, as in the one-machine lab), the arbiter sits on it as the
# clients' side; the node's address on it comes from here, not Vagrant.
guest_if=$(ip -o link | awk -F': ' '$2 != "lo" {print $2}' | sed -n 3p)
[ -n "$guest_if" ] || die "no third network interface for the guests' network (see the Vagrantfile)"
if [ "$role" = arbiter ]; then
	stanza="auto $guest_if
iface $guest_if inet static
	address $guest_ip/24"
else
	stanza="auto rmbr0
iface rmbr0 inet static
	address $guest_ip/24
	bridge_ports $guest_if
	bridge_stp off
	bridge_fd 0"
fi
pkgs=(ca-certificates curl unzip make gcc libc6-dev bridge-utils)
[ "$role" = arbiter ] || pkgs+=(libvirt-dev pkg-config)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	say "apt-get install ${missing[*]}"
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "$(cat /etc/network/interfaces.d/remora-guests 2>/dev/null)" != "$stanza" ]; then
	say "guests' network on $guest_if: $guest_ip/24"
	ifdown --force rmbr0 "$guest_if" >/dev/null 2>&1 || true
	printf '%s\n' "$stanza" >/etc/network/interfaces.d/remora-guests
fi
ifup rmbr0 >/dev/null 2>&1 || ifup "$guest_if" >/dev/null 2>&1 || true

# Go: the version go.mod names (its toolchain line, else its go line).
gover=$(awk '$1 == "toolchain" {sub(/^go/, "", $2); t = $2} $1 == "go" {g = $2} END {print t ? t : g}' "$src/go.mod")
go=/usr/local/go/bin/go
ensure_go() {
	[ "$("$go" env GOVERSION 2>/dev/null)" = "go$gover" ] && return
	say "Go $gover from the Go module proxy"
	local zip=/var/tmp/go$gover.zip
	curl -fsSL -o "$zip" "https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-go$gover.linux-amd64.zip" ||
		die "cannot fetch Go $gover from proxy.golang.org (the node needs it for the build; or put a package in out/: make deb)"
	rm -rf /usr/local/go /usr/local/go.new
	mkdir -p /usr/local/go.new
	unzip -q "$zip" -d /usr/local/go.new
	mv "/usr/local/go.new/golang.org/toolchain@v0.0.1-go$gover.linux-amd64" /usr/local/go
	rm -rf /usr/local/go.new "$zip"
	chmod +x /usr/local/go/bin/* /usr/local/go/pkg/tool/*/*
	ln -sf /usr/local/go/bin/go /usr/local/bin/go
}
# Builds in a copy: the synced tree stays as the host left it.
build=/var/tmp/remora-src
sync_src() { mkdir -p "$build" && cp -a "$src/." "$build/" && rm -rf "$build/out" "$build/bin"; }

deb=$(ls "$src"/out/remora_*_amd64.deb 2>/dev/null | sort -V | tail -1 || true)
if [ "${REMORA_BUILD:-}" = 1 ] || [ -z "$deb" ]; then
	ensure_go
	sync_src
	say "make deb (Go $gover$([ "$role" = arbiter ] && echo ', without cgo: no libvirt here'))"
	cgo=1
	[ "$role" = arbiter ] && cgo=0
	CGO_ENABLED=$cgo make -C "$build" deb VERSION=0.0~vagrant GO="$go" >/var/tmp/remora-build.log 2>&1 ||
		{ tail -20 /var/tmp/remora-build.log; die "make deb failed (whole log: /var/tmp/remora-build.log)"; }
	deb=$(ls "$build"/out/remora_*_amd64.deb | tail -1)
fi
say "install $(basename "$deb")"
apt-get install -y -qq --no-install-recommends "$deb" >/dev/null

# The node's certificate and the lab CA (the CA's key stays on the host).
install -d -m 0750 /etc/remora/pki
install -m 0644 "$pki/ca.crt" "$pki/$role.crt" /etc/remora/pki/
install -m 0600 "$pki/$role.key" /etc/remora/pki/

if [ "$role" = arbiter ]; then
	cat >/etc/remora/arbiter.yaml <<CFG
# Written by vagrant/provision.sh; see /usr/share/doc/remora for every key.
listen: $mgmt_ip:7410
state_dir: /var/lib/remora/arbiter
tls:
  cert: /etc/remora/pki/arbiter.crt
  key: /etc/remora/pki/arbiter.key
  ca: /etc/remora/pki/ca.crt
# Nested TCG is slow: the lossy-link detector, not the 100 ms x 5 default.
lease_duration: 3s
heartbeat:
  interval: 250ms
  missed: 4
CFG
	systemctl enable remora-arbiter >/dev/null 2>&1
	systemctl restart remora-arbiter
	say "arbiter up on $mgmt_ip:7410; clients here reach the guests on 10.77.0.0/24"
	exit 0
fi

# Host setup as in the one-machine lab: qemu.conf's memory_backing_dir
# (nothing else of Debian's stock settings changes), libvirtd, the guest
# image and labctl, which boots and drives lab guests.
ensure_go
[ -d "$build" ] || sync_src
REMORA_LAB_DIR=/var/lib/remora-lab GO="$go" "$build/test/lab/lab.sh" node
(cd "$build" && "$go" build -o /usr/local/bin/labctl ./test/labctl)

cat >/etc/remora/agent.yaml <<CFG
# Written by vagrant/provision.sh; see /usr/share/doc/remora for every key.
agent_id: $role
listen: $mgmt_ip:7400
arbiter: $arbiter:7410
tls_cert: /etc/remora/pki/$role.crt
tls_key: /etc/remora/pki/$role.key
tls_ca: /etc/remora/pki/ca.crt
# Nested TCG is slow: the lossy-link detector, not the 100 ms x 5 default.
heartbeat_interval: 250ms
heartbeat_missed: 4
# The standby's shell of a guest gets its own name on a node that runs both.
shell_suffix: "-$role"
# Lab guests boot the lab's kernel and initramfs: a standby's shell may too.
boot_dirs: [/var/lib/remora-lab]
CFG
systemctl enable remora-agent >/dev/null 2>&1
systemctl restart remora-agent
other=$standby
[ "$role" = standby ] && other=$primary
say "agent up on $mgmt_ip:7400. A guest: sudo labctl boot web 0 (10.77.0.10), then"
say "  sudo remora vm enroll web --standby $other:7400 --probe line:10.77.0.10:7000:get:"
