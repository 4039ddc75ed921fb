#!/usr/bin/env bash
# Builds out/remora_VERSION_amd64.deb from `make install DESTDIR=...`.
# Usage: test/deb/build.sh STAGE_DIR OUT_DIR VERSION
set -euo pipefail
stage=$1 out=$2 ver=$3
arch=$(dpkg --print-architecture)
mkdir -p "$stage/DEBIAN" "$out"
# Example configurations are conffiles: an upgrade keeps the admin's edits.
find "$stage/etc" -type f | sed "s|^$stage||" | sort >"$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: remora
Version: $ver
Architecture: $arch
Maintainer: remora developers <remora@localhost>
Installed-Size: $size
Depends: libc6, libvirt0
Recommends: libvirt-daemon-system, qemu-system-x86, iproute2
Section: admin
Priority: optional
Homepage: https://github.com/remora-ha/remora
Description: hot-standby replication of running libvirt/QEMU guests
 An agent on each hypervisor host checkpoints protected guests many times
 a second and ships the checkpoints to a standby host; the guests' network
 output is held until the standby has each checkpoint. An arbiter on a
 third machine grants leases and fencing epochs, so exactly one copy of a
 guest serves. Units: remora-agent.service, remora-arbiter.service (not
 enabled on install: configure /etc/remora first).
CONTROL
# Services are neither enabled nor started: the configuration needs this
# host's name and certificates first (see the operator's guide).
# Where libvirt confines QEMU with AppArmor, QEMU must reach the agent's
# sockets: libvirt's QEMU abstraction includes the site's local additions,
# which get remora's (the line goes on removal). Running guests' profiles
# are reloaded; new ones are built with it.
cat >"$stage/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
aa_local=/etc/apparmor.d/local/abstractions/libvirt-qemu
aa_line='include if exists <abstractions/remora-qemu>'
if [ "$1" = configure ] && [ -f /etc/apparmor.d/abstractions/libvirt-qemu ] && ! grep -qxF "$aa_line" "$aa_local" 2>/dev/null; then
	mkdir -p "$(dirname "$aa_local")"
	echo "$aa_line" >>"$aa_local"
	if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ] && command -v apparmor_parser >/dev/null; then
		for p in /etc/apparmor.d/libvirt/libvirt-*; do
			case "$p" in *.files) continue ;; esac
			[ -f "$p" ] && apparmor_parser -r "$p" 2>/dev/null || true
		done
	fi
fi
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
	# An upgrade restarts what was running.
	for u in remora-agent.service remora-arbiter.service; do
		if systemctl is-active --quiet "$u"; then systemctl try-restart "$u" || true; fi
	done
fi
exit 0
SCRIPT
cat >"$stage/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
# Removal stops the services (an upgrade leaves them to postinst's restart;
# the agent's stop hands its protected guests over, it does not drop them).
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
	systemctl stop remora-agent.service remora-arbiter.service || true
	systemctl disable remora-agent.service remora-arbiter.service || true
fi
exit 0
SCRIPT
cat >"$stage/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
aa_local=/etc/apparmor.d/local/abstractions/libvirt-qemu
if [ "$1" = remove ] || [ "$1" = purge ]; then
	if [ -f "$aa_local" ]; then sed -i '\|^include if exists <abstractions/remora-qemu>$|d' "$aa_local"; fi
fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
exit 0
SCRIPT
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"
deb="$out/remora_${ver}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
