#!/usr/bin/env bash
# Provisions one node of the Vagrant lab: $1 role, $2 its address, then the
# primary's, the standby's and the arbiter's addresses.
set -euo pipefail
role=$1 ip=$2 primary=$3 standby=$4 arbiter=$5
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y golang-go make ca-certificates
if [ "$role" != arbiter ]; then
	apt-get install -y qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-dev busybox-static iproute2 cpio
	grep -q '^memory_backing_dir' /etc/libvirt/qemu.conf || echo 'memory_backing_dir = "/dev/shm/remora"' >>/etc/libvirt/qemu.conf
	mkdir -p /dev/shm/remora
	systemctl restart libvirtd
fi
cd /remora
go build -o /usr/local/bin/remora ./cmd/remora

# One lab CA, made on the arbiter's first provisioning and shared through
# the synced folder (a lab shortcut; use your own PKI in production).
pki=/remora/vagrant/.pki
if [ ! -f "$pki/ca.crt" ]; then
	remora certs init "$pki"
	remora certs issue arbiter --dir "$pki" --ip "$arbiter"
	remora certs issue primary --dir "$pki" --ip "$primary"
	remora certs issue standby --dir "$pki" --ip "$standby"
fi
mkdir -p /etc/remora
cp -r "$pki" /etc/remora/pki
chmod 600 /etc/remora/pki/*.key

if [ "$role" = arbiter ]; then
	cp configs/arbiter.yaml /etc/remora/arbiter.yaml # its TLS paths are /etc/remora/pki
	nohup remora arbiter --config /etc/remora/arbiter.yaml >/var/log/remora-arbiter.log 2>&1 &
	exit 0
fi
cat >/etc/remora/agent.yaml <<CFG
agent_id: $role
listen: $ip:7400
arbiter: $arbiter:7410
tls_cert: /etc/remora/pki/$role.crt
tls_key: /etc/remora/pki/$role.key
tls_ca: /etc/remora/pki/ca.crt
CFG
nohup remora agent --config /etc/remora/agent.yaml >/var/log/remora-agent.log 2>&1 &
echo "$role ready: enroll a guest on the primary with"
echo "  remora vm enroll GUEST --standby $standby:7400 --probe tcp:GUEST-IP:PORT"
