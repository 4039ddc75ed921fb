#!/usr/bin/env bash
# remora demo on one machine: host A and host B are network namespaces of
# the lab (test/lab/lab.sh), sharing this machine's libvirt. A real guest is
# booted on A, protected on B, A crashes, B takes over.
set -euo pipefail
cd "$(dirname "$0")/.."
REMORA=$PWD/bin/remora
LABCTL=$PWD/bin/labctl
GUEST=demo
GUEST_IP=10.77.0.20
WORK=$(mktemp -d /tmp/remora-demo.XXXXXX)
chmod 0711 "$WORK" # QEMU (libvirt-qemu) reaches the agents' sockets and images in it
PIDS=()

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	"$LABCTL" destroy "$GUEST" >/dev/null 2>&1 || true
	"$LABCTL" destroy "$GUEST-b" >/dev/null 2>&1 || true # a promoted shell is defined
	rm -rf "$WORK"
}
trap cleanup EXIT

agent_config() { # name netns-ip
	mkdir -p "$WORK/$1"
	cat >"$WORK/$1/agent.yaml" <<CFG
agent_id: host-$1
listen: $2:7400
api_socket: $WORK/$1/agent.sock
state_dir: $WORK/$1/state
runtime_dir: $WORK/$1/run
epoch_interval: 100ms
shell_suffix: "-$1"
tls_cert: $WORK/pki/host-$1.crt
tls_key: $WORK/pki/host-$1.key
tls_ca: $WORK/pki/ca.crt
boot_dirs: [${REMORA_LAB_DIR:-/var/lib/remora-lab}]
CFG
}
start_agent() { # name netns
	ip netns exec "$2" "$REMORA" agent --config "$WORK/$1/agent.yaml" >"$WORK/$1/agent.log" 2>&1 &
	PIDS+=($!)
	for _ in $(seq 50); do [ -S "$WORK/$1/agent.sock" ] && return 0; sleep 0.1; done
	echo "agent $1 did not start:"; cat "$WORK/$1/agent.log"; exit 1
}
a() { ip netns exec rm-a "$REMORA" --config "$WORK/a/agent.yaml" "$@"; }
b() { ip netns exec rm-b "$REMORA" --config "$WORK/b/agent.yaml" "$@"; }

step "Booting guest '$GUEST' on host A (TCG, 256 MiB, RAM in a shared file)"
"$LABCTL" boot "$GUEST" 10 2000

step "Certificates for the cluster: a CA, each agent (mutual TLS on every port)"
"$REMORA" certs cluster "$WORK/pki" --agent host-a=10.77.0.2 --agent host-b=10.77.0.3 | grep -E '^(created|issued)'

step "Starting the agents: host A (10.77.0.2) and host B (10.77.0.3), each in its own network namespace"
agent_config a 10.77.0.2
agent_config b 10.77.0.3
start_agent a rm-a
start_agent b rm-b

step "Enrolling '$GUEST' on host A with host B as its standby (initial full sync)"
a vm enroll "$GUEST" --standby 10.77.0.3:7400

step "The guest's counter service, while protected"
"$LABCTL" do "$GUEST_IP" inc inc inc "writer 5000"
sleep 3
"$LABCTL" do "$GUEST_IP" inc check

step "Status on host A (primary) and host B (standby)"
a vm status
b vm status

step "Crashing host A: SIGKILL its agent, destroy its guest"
kill -9 "${PIDS[0]}"
virsh -q destroy "$GUEST"
sleep 1
b vm status

step "Failing over on host B"
b vm failover "$GUEST"

step "The counter still counts on host B, and guest memory passes the integrity check"
"$LABCTL" do "$GUEST_IP" inc inc check stats
b vm status
virsh -q list | grep -E "$GUEST" || true
step "Demo done"
