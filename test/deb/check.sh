#!/usr/bin/env bash
# Installs a remora .deb into a fresh Debian 12 root made with debootstrap
# and checks it there: dependencies resolve, the binary runs, man pages and
# completions are in place, and the units pass systemd-analyze verify in
# that root. No systemd needs to run.
# Usage: test/deb/check.sh PACKAGE.deb
set -euo pipefail
deb=$(realpath "$1")
cache=${REMORA_DEBROOT_CACHE:-/var/cache/remora-lab/debroot-bookworm.tar}
mirror=${REMORA_DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}
say() { printf '== %s\n' "$*"; }
die() { printf 'deb-test: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot)"
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }

root=$(mktemp -d /var/tmp/remora-debroot.XXXXXX)
cleanup() {
	for m in proc dev; do umount -l "$root/$m" 2>/dev/null || true; done
	rm -rf "$root"
}
trap cleanup EXIT
if [ -f "$cache" ]; then
	say "Debian 12 root from $cache"
	tar -C "$root" -xf "$cache"
else
	say "debootstrap bookworm (minbase) from $mirror"
	debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log"; die "debootstrap failed"; }
	rm -f "$root.log"
	mkdir -p "$(dirname "$cache")"
	tar -C "$root" -cf "$cache" .
fi
chmod 0755 "$root" # a root directory: users in it (_apt, man) must reach /
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
cp "$deb" "$root/tmp/"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }

# libvirt's AppArmor abstraction, as libvirt-daemon-system leaves it: the
# package adds its include to the site's local additions, once.
mkdir -p "$root/etc/apparmor.d/abstractions" "$root/etc/apparmor.d/local/abstractions"
echo '  #include <local/abstractions/libvirt-qemu>' >"$root/etc/apparmor.d/abstractions/libvirt-qemu"
: >"$root/etc/apparmor.d/local/abstractions/libvirt-qemu"
aa_line='include if exists <abstractions/remora-qemu>'

say "apt-get install $(basename "$deb") (and systemd, for systemd-analyze)"
in_root apt-get update -qq
in_root apt-get install -y -qq --no-install-recommends "/tmp/$(basename "$deb")" systemd man-db >/dev/null

say "remora version"
in_root remora version
say "files"
for f in /usr/bin/remora /usr/lib/systemd/system/remora-agent.service /usr/lib/systemd/system/remora-arbiter.service \
	/etc/remora/agent.yaml /etc/remora/arbiter.yaml /usr/share/man/man1/remora-agent.1.gz \
	/usr/share/bash-completion/completions/remora /usr/share/doc/remora/operator-guide.md /etc/libvirt/hooks/qemu.d/50-remora \
	/etc/apparmor.d/abstractions/remora-qemu; do
	[ -e "$root$f" ] || die "$f is not installed"
done
say "libvirt hook: a guest remora does not protect may start"
in_root /etc/libvirt/hooks/qemu.d/50-remora web prepare begin - </dev/null || die "the libvirt hook refused an unprotected guest"
in_root dpkg-query -W -f='${Package} ${Version} ${Status}\n' remora
say "man remora-agent"
in_root man -P cat remora-agent 2>/dev/null | head -5

say "systemd-analyze verify (in the root)"
out=$(in_root systemd-analyze verify remora-agent.service remora-arbiter.service 2>&1) || die "systemd-analyze verify failed: $out"
# verify exits 0 on directives it ignores: any output is a defect.
[ -z "$out" ] || die "systemd-analyze verify: $out"

say "AppArmor: libvirt's QEMU profile includes remora's rules, once, until removal"
[ "$(grep -cxF "$aa_line" "$root/etc/apparmor.d/local/abstractions/libvirt-qemu")" = 1 ] ||
	die "the install did not add '$aa_line' to /etc/apparmor.d/local/abstractions/libvirt-qemu once"
in_root dpkg-reconfigure remora >/dev/null 2>&1 || in_root /var/lib/dpkg/info/remora.postinst configure >/dev/null
[ "$(grep -cxF "$aa_line" "$root/etc/apparmor.d/local/abstractions/libvirt-qemu")" = 1 ] ||
	die "configuring again added '$aa_line' twice"
in_root apt-get remove -y -qq remora >/dev/null
! grep -qxF "$aa_line" "$root/etc/apparmor.d/local/abstractions/libvirt-qemu" ||
	die "removing the package left '$aa_line' in /etc/apparmor.d/local/abstractions/libvirt-qemu"
say "package ok"
