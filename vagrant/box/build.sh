#!/usr/bin/env bash
# Builds a Debian 12 box for vagrant-libvirt with debootstrap, for hosts
# that cannot download one (where they can, the Vagrantfile's default,
# debian/bookworm64, is the usual way). As root:
#
#   vagrant/box/build.sh [OUT.box]   # default vagrant/.box/bookworm.box
#   vagrant box add --name remora/bookworm vagrant/.box/bookworm.box
#   REMORA_VAGRANT_BOX=remora/bookworm vagrant up
#
# The box: one ext4 partition booted by extlinux, Debian's kernel and
# AppArmor (as a standard Debian install has them), eth0 on
# DHCP, ssh, the user vagrant (password vagrant, sudo without one, Vagrant's
# well-known key, which vagrant replaces at the first `up`).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$(realpath -m "${1:-$here/../.box/bookworm.box}")
size=${REMORA_BOX_SIZE:-20G}
mirror=${REMORA_DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}
say() { printf '== %s\n' "$*"; }
die() { printf 'box: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, loop devices, mount)"
need=()
for p in debootstrap extlinux syslinux-common qemu-utils fdisk vagrant; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
	say "apt-get install ${need[*]}"
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
key=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -1 || true)
[ -n "$key" ] || die "Vagrant's well-known public key (keys/vagrant.pub) not found: is vagrant installed?"

work=$(mktemp -d /var/tmp/remora-box.XXXXXX)
root=$work/root
loop=
cleanup() {
	for m in dev/pts dev proc sys; do umount -l "$root/$m" 2>/dev/null || true; done
	umount -l "$root" 2>/dev/null || true
	[ -z "$loop" ] || losetup -d "$loop" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

say "disk: $size, one bootable partition"
truncate -s "$size" "$work/disk.raw"
echo 'start=2048, type=83, bootable' | sfdisk -q --label dos "$work/disk.raw"
# The partition through a loop device at its offset: no partition device
# nodes needed (none appear without udev).
loop=$(losetup -f --show -o $((2048 * 512)) "$work/disk.raw")
mkfs.ext4 -q -L root "$loop"
mkdir -p "$root"
mount "$loop" "$root"

say "debootstrap bookworm from $mirror"
debootstrap --include=linux-image-amd64,apparmor,openssh-server,sudo,ifupdown,isc-dhcp-client,rsync,ca-certificates,curl,locales \
	bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; die "debootstrap failed"; }

say "configure"
echo bookworm >"$root/etc/hostname"
echo 'LABEL=root / ext4 errors=remount-ro 0 1' >"$root/etc/fstab"
cat >"$root/etc/network/interfaces" <<'EOF'
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
allow-hotplug eth0
iface eth0 inet dhcp
EOF
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
in_root useradd -m -s /bin/bash -G sudo vagrant
echo 'vagrant:vagrant' | in_root chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$key" "$root/home/vagrant/.ssh/authorized_keys"
echo 'UseDNS no' >"$root/etc/ssh/sshd_config.d/vagrant.conf"
rm -f "$root"/etc/ssh/ssh_host_*key* # each machine made from the box gets its own
cat >"$root/etc/systemd/system/ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Generate this machine's ssh host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable ssh-hostkeys.service >/dev/null 2>&1
: >"$root/etc/machine-id" # each machine made from the box gets its own
in_root apt-get clean

say "extlinux"
kernel=$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -1)
initrd=initrd.img-${kernel#vmlinuz-}
[ -f "$root/boot/$initrd" ] || die "no $initrd in the root"
mkdir -p "$root/boot/extlinux"
cat >"$root/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
TIMEOUT 1
LABEL debian
  LINUX /boot/$kernel
  INITRD /boot/$initrd
  APPEND root=LABEL=root ro net.ifnames=0 biosdevname=0 console=tty0 console=ttyS0,115200n8
EOF
extlinux --install "$root/boot/extlinux" >/dev/null 2>&1
for m in dev/pts dev proc sys; do umount -l "$root/$m"; done
umount "$root"
losetup -d "$loop"
loop=
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none

say "box $out"
qemu-img convert -O qcow2 "$work/disk.raw" "$work/box.img"
gib=$(( $(qemu-img info --output=json "$work/box.img" | awk -F': ' '/"virtual-size"/ {gsub(",", "", $2); print $2}') >> 30 ))
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$gib" >"$work/metadata.json"
mkdir -p "$(dirname "$out")"
tar -C "$work" -cf "$out" metadata.json box.img
say "done: vagrant box add --name remora/bookworm $out"
