#!/usr/bin/env bash
# remora lab: one machine playing primary, standby, arbiter and client.
#
#   test/lab/lab.sh up     install packages, configure and start libvirt, build
#                          the guest image, create the lab network (idempotent)
#   test/lab/lab.sh down   remove the lab domains, namespaces and bridge
#                          (keeps the image cache and the libvirt config)
#   test/lab/lab.sh env    print the lab facts as shell variables:
#                          eval "$(test/lab/lab.sh env)"
#   test/lab/lab.sh node   a host of a multi-machine lab (vagrant/): packages,
#                          qemu.conf, libvirt and the guest image; its network
#                          (rmbr0 on the guests' link) is the host's own
#
# Needs root on Debian 12 (bookworm) and a Go toolchain (go in PATH, or
# /usr/local/go/bin/go, or $GO). Guests run under TCG (domain type='qemu').
# Environment: REMORA_LAB_DIR (default /var/lib/remora-lab).
set -eEuo pipefail

LAB_DIR=${REMORA_LAB_DIR:-/var/lib/remora-lab}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
LIBVIRT_URI=qemu:///system
QEMU_CONF=/etc/libvirt/qemu.conf
MEMORY_BACKING_DIR=/dev/shm/remora
AGENT_RUN_DIR=/run/remora
GUEST_PORT=7000
# Bumped when the image layout changes, to force a rebuild.
IMAGE_FORMAT=1

BRIDGE=rmbr0
BRIDGE_MAC=02:77:00:00:00:01
PREFIX=24
BRIDGE_IP=10.77.0.1
GUEST_IP_FIRST=10.77.0.10
# namespace:ip:host-side veth
NAMESPACES=(
	"rm-a:10.77.0.2:rmv-a"
	"rm-b:10.77.0.3:rmv-b"
	"rm-arb:10.77.0.4:rmv-arb"
	"rm-client:10.77.0.5:rmv-client"
)
NS_IFACE=eth0

# Loaded in this order by the guest's /init; built-in ones are skipped.
GUEST_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
	failover net_failover virtio_net virtio_blk)
APT_PACKAGES=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
	busybox-static iproute2 cpio xz-utils gzip systemd debootstrap wrk)
# The metadata element that marks a domain as a lab domain (see test/labkit).
LAB_METADATA_URI=https://github.com/remora-ha/remora/lab

say() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
	printf 'lab.sh: error: %s\n' "$*" >&2
	exit 1
}
trap 'printf "lab.sh: error: command failed (line %d): %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

need_root() {
	[ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo $0 $*)"
}

virsh_() { virsh -q -c "$LIBVIRT_URI" "$@"; }

# ---------------------------------------------------------------- packages

ensure_packages() {
	command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12 only"
	local missing=() p
	for p in "${APT_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
	done
	if [ ${#missing[@]} -eq 0 ]; then
		info "packages: all installed"
		return
	fi
	say "installing packages: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update || die "apt-get update failed: check /etc/apt/sources.list and network access to the Debian mirror"
	apt-get install -y --no-install-recommends "${missing[@]}" ||
		die "apt-get install ${missing[*]} failed (see above)"
	APT_UPDATED=1
}

# ---------------------------------------------------------------- libvirt

# The one setting the lab needs in qemu.conf: guest RAM files on tmpfs,
# where the agent maps them. Everything else stays as Debian ships it (QEMU
# as libvirt-qemu, dynamic ownership, the default security driver); the
# keys an older lab set are put back to their defaults here.
QEMU_CONF_SETTINGS=(
	"memory_backing_dir = \"$MEMORY_BACKING_DIR\""
)
QEMU_CONF_RETIRED_KEYS="user group dynamic_ownership remember_owner security_driver"

# Writes to stdout the wanted qemu.conf: the current one with any active
# setting of our keys commented out, and our block at the end.
render_qemu_conf() {
	local keys="" s
	for s in "${QEMU_CONF_SETTINGS[@]}"; do keys+="${s%% *} "; done
	awk -v keys="$keys" -v retired="$QEMU_CONF_RETIRED_KEYS" '
		BEGIN {
			n = split(keys, k, " "); for (i = 1; i <= n; i++) K[k[i]] = 1
			n = split(retired, r, " "); for (i = 1; i <= n; i++) R[r[i]] = 1
		}
		# What an older lab commented out goes back as it was, unless ours.
		/^#remora-lab-disabled# / {
			line = $0; sub(/^#remora-lab-disabled# /, "", line)
			key = line; sub(/^[ \t]*/, "", key); sub(/[ \t]*=.*/, "", key)
			if (key in R) { print line; next }
		}
		/^# BEGIN remora-lab/ { skip = 1; next }
		/^# END remora-lab/ { skip = 0; next }
		skip { next }
		{
			line = $0
			if (match(line, /^[ \t]*[A-Za-z_]+[ \t]*=/)) {
				key = line; sub(/^[ \t]*/, "", key); sub(/[ \t]*=.*/, "", key)
				if (key in K) { print "#remora-lab-disabled# " line; next }
			}
			print
		}' "$QEMU_CONF"
	echo "# BEGIN remora-lab (managed by test/lab/lab.sh; edit there)"
	for s in "${QEMU_CONF_SETTINGS[@]}"; do echo "$s"; done
	echo "# END remora-lab"
}

# Without udev (containers, this CI) /dev/kvm stays root-only. libvirt
# probes KVM as root but checks it as QEMU's user, finds the cached
# capabilities stale on every call and reprobes QEMU (virsh define then
# takes minutes). Debian's udev gives it to group kvm, which libvirt-qemu
# is in; the lab's guests run under TCG either way (type='qemu').
ensure_kvm_node() {
	[ -c /dev/kvm ] || return 0
	getent group kvm >/dev/null || return 0
	if [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ] && [ "$(stat -c %a /dev/kvm)" != 666 ]; then
		chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
		QEMU_CONF_CHANGED=1 # libvirtd rereads what QEMU can use
		say "/dev/kvm: group kvm, mode 0660 (as Debian's udev rules set it)"
	fi
}

# The libvirt hook of every agent a test runs (remora libvirt-hook), each
# registered by the test harness in $LAB_HOOKS as "BINARY CONFIG".
LAB_HOOKS=/run/remora/lab-hooks
LAB_HOOK=/etc/libvirt/hooks/qemu.d/50-remora-lab
ensure_libvirt_hook() {
	local tmp
	tmp=$(mktemp)
	cat >"$tmp" <<HOOK
#!/bin/sh
# remora lab (managed by test/lab/lab.sh): runs the libvirt hook of each
# agent a test registered in $LAB_HOOKS, each with the domain XML libvirt
# gives on stdin.
xml=\$(mktemp) && trap 'rm -f "\$xml"' EXIT && cat >"\$xml"
for f in $LAB_HOOKS/*; do
	[ -f "\$f" ] || continue
	read -r bin cfg <"\$f" || continue
	[ -x "\$bin" ] && [ -f "\$cfg" ] || continue
	"\$bin" libvirt-hook --config "\$cfg" "\$@" <"\$xml" || exit 1
done
exit 0
HOOK
	if ! cmp -s "$tmp" "$LAB_HOOK"; then
		mkdir -p "$(dirname "$LAB_HOOK")"
		install -m 0755 "$tmp" "$LAB_HOOK"
		QEMU_CONF_CHANGED=1 # libvirtd finds hooks at its start
		say "libvirt hook: $LAB_HOOK"
	fi
	rm -f "$tmp"
	mkdir -p "$LAB_HOOKS"
}

QEMU_CONF_CHANGED=0
ensure_qemu_conf() {
	[ -f "$QEMU_CONF" ] || die "$QEMU_CONF missing: is libvirt-daemon-system installed? (apt-get install libvirt-daemon-system)"
	local tmp
	tmp=$(mktemp "$QEMU_CONF.remora.XXXXXX")
	render_qemu_conf >"$tmp"
	if cmp -s "$tmp" "$QEMU_CONF"; then
		rm -f "$tmp"
		info "qemu.conf: up to date"
	else
		[ -f "$QEMU_CONF.remora-orig" ] || cp -p "$QEMU_CONF" "$QEMU_CONF.remora-orig"
		# In place, not mv: keeps owner and mode, and works if the file is
		# a mount (containers).
		cat "$tmp" >"$QEMU_CONF"
		rm -f "$tmp"
		QEMU_CONF_CHANGED=1
		say "qemu.conf updated (original saved as $QEMU_CONF.remora-orig)"
	fi
	mkdir -p "$MEMORY_BACKING_DIR" "$AGENT_RUN_DIR"
}

have_systemd() { [ -d /run/systemd/system ]; }

pid_alive() { # pidfile
	local pid
	[ -f "$1" ] && pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# proc_running NAME: is a process with that command name running? (no procps
# on minimal images)
proc_running() {
	local c
	for c in /proc/[0-9]*/comm; do
		[ "$(cat "$c" 2>/dev/null)" = "$1" ] && return 0
	done
	return 1
}

libvirt_up() { virsh -c "$LIBVIRT_URI" version >/dev/null 2>&1; }

wait_libvirt() {
	for _ in $(seq 1 100); do
		libvirt_up && return 0
		sleep 0.2
	done
	die "libvirtd does not answer on $LIBVIRT_URI after 20s; run 'libvirtd' in the foreground to see why, or check /var/log/libvirt"
}

stop_libvirtd() {
	local pid
	pid=$(cat /run/libvirtd.pid 2>/dev/null || true)
	if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
		return 0
	fi
	kill -TERM "$pid"
	for _ in $(seq 1 100); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	die "libvirtd (pid $pid) did not exit after SIGTERM; stop it and rerun"
}

ensure_daemons() {
	if have_systemd; then
		systemctl start virtlogd.socket virtlogd libvirtd.socket libvirtd >/dev/null 2>&1 || true
		if [ "$QEMU_CONF_CHANGED" = 1 ]; then
			say "restarting libvirtd (qemu.conf changed)"
			systemctl restart libvirtd
		fi
	else
		if ! pid_alive /run/virtlogd.pid && ! proc_running virtlogd; then
			say "starting virtlogd"
			virtlogd -d || die "virtlogd -d failed"
		fi
		if [ "$QEMU_CONF_CHANGED" = 1 ] && pid_alive /run/libvirtd.pid; then
			say "restarting libvirtd (qemu.conf changed)"
			stop_libvirtd
		elif [ "$QEMU_CONF_CHANGED" = 1 ] && proc_running libvirtd; then
			die "qemu.conf changed but libvirtd runs without /run/libvirtd.pid; restart it by hand and rerun"
		fi
		if ! pid_alive /run/libvirtd.pid && ! proc_running libvirtd; then
			say "starting libvirtd"
			libvirtd -d || die "libvirtd -d failed; run 'libvirtd' in the foreground to see why"
		fi
	fi
	wait_libvirt
	info "libvirt: $(virsh -c "$LIBVIRT_URI" version 2>/dev/null | awk '/Running hypervisor/ {print $3, $4}')," \
		"libvirt $(virsh -c "$LIBVIRT_URI" version 2>/dev/null | awk '/Using library/ {print $4}')"
}

# ---------------------------------------------------------------- network

NET_CHANGED=0
changed() {
	NET_CHANGED=1
	info "$*"
}

ensure_network() {
	local spec ns ip veth
	if [ -d /proc/sys/net/bridge ]; then
		# br_netfilter is loaded: keep iptables out of bridged lab traffic.
		local f
		for f in bridge-nf-call-iptables bridge-nf-call-ip6tables bridge-nf-call-arptables; do
			if [ -w /proc/sys/net/bridge/$f ] && [ "$(cat /proc/sys/net/bridge/$f)" != 0 ]; then
				echo 0 >/proc/sys/net/bridge/$f
				changed "sysctl net.bridge.$f=0"
			fi
		done
	fi
	if ! ip link show dev "$BRIDGE" >/dev/null 2>&1; then
		ip link add "$BRIDGE" type bridge stp_state 0 forward_delay 0 ||
			die "cannot create bridge $BRIDGE (is the bridge module available? modprobe bridge)"
		changed "created bridge $BRIDGE"
	fi
	ip link set dev "$BRIDGE" type bridge stp_state 0 forward_delay 0
	if [ "$(cat /sys/class/net/$BRIDGE/address)" != "$BRIDGE_MAC" ]; then
		ip link set dev "$BRIDGE" address "$BRIDGE_MAC"
		changed "set $BRIDGE address $BRIDGE_MAC"
	fi
	if ! ip -4 -o addr show dev "$BRIDGE" | grep -q " $BRIDGE_IP/$PREFIX "; then
		ip addr replace "$BRIDGE_IP/$PREFIX" dev "$BRIDGE"
		changed "$BRIDGE: $BRIDGE_IP/$PREFIX"
	fi
	if ! ip link show dev "$BRIDGE" | grep -q '[<,]UP[,>]'; then
		ip link set dev "$BRIDGE" up
		changed "$BRIDGE up"
	fi
	for spec in "${NAMESPACES[@]}"; do
		IFS=: read -r ns ip veth <<<"$spec"
		if [ ! -e "/run/netns/$ns" ]; then
			ip netns add "$ns"
			changed "created namespace $ns"
		fi
		if ip link show dev "$veth" >/dev/null 2>&1 && ! ip -n "$ns" link show dev "$NS_IFACE" >/dev/null 2>&1; then
			ip link del dev "$veth"
			changed "removed $veth (its peer was not in $ns)"
		fi
		if ! ip link show dev "$veth" >/dev/null 2>&1; then
			ip -n "$ns" link del dev "$NS_IFACE" >/dev/null 2>&1 || true
			ip link add "$veth" type veth peer name "$NS_IFACE" netns "$ns"
			changed "created veth $veth <-> $ns:$NS_IFACE"
		fi
		if [ "$(basename "$(readlink -f "/sys/class/net/$veth/master" 2>/dev/null)" 2>/dev/null)" != "$BRIDGE" ]; then
			ip link set dev "$veth" master "$BRIDGE"
			changed "$veth joined $BRIDGE"
		fi
		if ! ip link show dev "$veth" | grep -q '[<,]UP[,>]'; then
			ip link set dev "$veth" up
			changed "$veth up"
		fi
		if ! ip -n "$ns" link show dev lo | grep -q '[<,]UP[,>]'; then
			ip -n "$ns" link set dev lo up
			changed "$ns: lo up"
		fi
		if ! ip -n "$ns" -4 -o addr show dev "$NS_IFACE" | grep -q " $ip/$PREFIX "; then
			ip -n "$ns" addr replace "$ip/$PREFIX" dev "$NS_IFACE"
			changed "$ns: $NS_IFACE $ip/$PREFIX"
		fi
		if ! ip -n "$ns" link show dev "$NS_IFACE" | grep -q '[<,]UP[,>]'; then
			ip -n "$ns" link set dev "$NS_IFACE" up
			changed "$ns: $NS_IFACE up"
		fi
		if ! ip -n "$ns" route show default | grep -q "via $BRIDGE_IP "; then
			ip -n "$ns" route replace default via "$BRIDGE_IP"
			changed "$ns: default via $BRIDGE_IP"
		fi
	done
	[ "$NET_CHANGED" = 1 ] || info "network: up to date"
}

teardown_network() {
	local spec ns ip veth
	for spec in "${NAMESPACES[@]}"; do
		IFS=: read -r ns ip veth <<<"$spec"
		if ip link show dev "$veth" >/dev/null 2>&1; then
			ip link del dev "$veth"
			info "removed $veth"
		fi
		if [ -e "/run/netns/$ns" ]; then
			ip netns del "$ns"
			info "removed namespace $ns"
		fi
	done
	if ip link show dev "$BRIDGE" >/dev/null 2>&1; then
		ip link del dev "$BRIDGE"
		info "removed bridge $BRIDGE"
	fi
}

# ---------------------------------------------------------------- guest image

find_go() {
	if [ -n "${GO:-}" ]; then
		echo "$GO"
	elif command -v go >/dev/null; then
		command -v go
	elif [ -x /usr/local/go/bin/go ]; then
		echo /usr/local/go/bin/go
	else
		die "no Go toolchain: install Go (https://go.dev/dl, the version in go.mod) into /usr/local/go, put go in PATH, or set GO=/path/to/go"
	fi
}

# Prints "name version" of the kernel package linux-image-amd64 depends on.
kernel_package() {
	if ! apt-cache show linux-image-amd64 >/dev/null 2>&1 && [ -z "${APT_UPDATED:-}" ]; then
		say "apt-get update (no package lists for linux-image-amd64)" >&2
		DEBIAN_FRONTEND=noninteractive apt-get update >&2 || die "apt-get update failed"
		APT_UPDATED=1
	fi
	local name ver
	name=$(apt-cache depends linux-image-amd64 2>/dev/null |
		awk '!found && $1 == "Depends:" && $2 ~ /^linux-image-6\.1\.0-[0-9]+-amd64$/ { print $2; found = 1 }')
	if [ -z "$name" ]; then
		name=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n1)
	fi
	[ -n "$name" ] || die "no linux-image-6.1.0-*-amd64 package found by apt-cache; is this Debian 12 with main in sources.list? (apt-get update)"
	ver=$(apt-cache policy "$name" | awk '/Candidate:/ {print $2}')
	if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
		die "package $name has no installable candidate"
	fi
	echo "$name $ver"
}

# Fetches the kernel package into $LAB_DIR/kernel/<name>_<version>/ and
# keeps only vmlinuz, modules.builtin and the guest modules (decompressed).
ensure_kernel() {
	local name=$1 ver=$2 dir tmp deb kver m f found
	dir="$LAB_DIR/kernel/${name}_${ver}"
	if [ -f "$dir/.complete" ]; then
		info "kernel: $name $ver (cached)"
		KERNEL_DIR=$dir
		return
	fi
	say "fetching kernel package $name $ver"
	tmp=$(mktemp -d "$LAB_DIR/tmp.kernel.XXXXXX")
	(cd "$tmp" && apt-get download -o APT::Sandbox::User=root "$name=$ver") ||
		die "apt-get download $name=$ver failed (network access to the Debian mirror?)"
	deb=$(ls "$tmp"/*.deb)
	info "unpacking $(basename "$deb") ($(du -h "$deb" | cut -f1))"
	mkdir "$tmp/root"
	dpkg -x "$deb" "$tmp/root"
	kver=${name#linux-image-}
	[ -f "$tmp/root/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $deb"
	rm -rf "$dir.new"
	mkdir -p "$dir.new/modules"
	cp "$tmp/root/boot/vmlinuz-$kver" "$dir.new/vmlinuz"
	cp "$tmp/root/lib/modules/$kver/modules.builtin" "$dir.new/modules.builtin"
	: >"$dir.new/modules.list"
	for m in "${GUEST_MODULES[@]}"; do
		if grep -Eq "/$m\.ko(\.[a-z]+)?\$" "$dir.new/modules.builtin"; then
			info "module $m: built into the kernel"
			continue
		fi
		found=$(find "$tmp/root/lib/modules/$kver/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) -print -quit)
		[ -n "$found" ] || die "module $m is neither built in nor in $name"
		f="$dir.new/modules/$m.ko"
		case "$found" in
		*.xz) xz -dc "$found" >"$f" ;;
		*.zst) command -v zstd >/dev/null || die "zstd needed for $found (apt-get install zstd)"; zstd -qdc "$found" >"$f" ;;
		*.gz) gzip -dc "$found" >"$f" ;;
		*) cp "$found" "$f" ;;
		esac
		echo "$m" >>"$dir.new/modules.list"
	done
	echo "$name $ver" >"$dir.new/.complete"
	rm -rf "$dir"
	mv "$dir.new" "$dir"
	rm -rf "$tmp"
	# Drop older kernels.
	for f in "$LAB_DIR"/kernel/*/; do
		[ "${f%/}" = "$dir" ] || rm -rf "${f%/}"
	done
	KERNEL_DIR=$dir
	info "kernel: $name $ver, modules: $(tr '\n' ' ' <"$dir/modules.list")"
}

ensure_image() {
	mkdir -p "$LAB_DIR" "$LAB_DIR/console" "$LAB_DIR/domains"
	local go kpkg name ver build busybox bin stamp_new stamp_old mods
	go=$(find_go)
	kpkg=$(kernel_package)
	read -r name ver <<<"$kpkg"
	ensure_kernel "$name" "$ver"

	build="$LAB_DIR/build"
	mkdir -p "$build"
	info "building the guest workload (test/guest) with $("$go" version | awk '{print $3}')"
	(cd "$REPO_DIR" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 "$go" build -trimpath -ldflags='-s -w' \
		-o "$build/remora-guest" ./test/guest) ||
		die "go build ./test/guest failed (see above)"
	busybox=$(command -v busybox || true)
	[ -n "$busybox" ] && file_is_static "$busybox" || busybox=/bin/busybox
	file_is_static "$busybox" || die "no static busybox (apt-get install busybox-static)"

	stamp_new=$(
		{
			echo "format $IMAGE_FORMAT"
			cat "$KERNEL_DIR/.complete"
			mods=$(find "$KERNEL_DIR/modules" -name '*.ko' | sort)
			# shellcheck disable=SC2086 # module paths have no spaces
			sha256sum "$KERNEL_DIR/vmlinuz" $mods "$busybox" "$build/remora-guest" \
				"$SCRIPT_DIR/guest-init.sh" | awk '{print $1}'
			cat "$KERNEL_DIR/modules.list"
		} | sha256sum | awk '{print $1}'
	)
	stamp_old=$(cat "$LAB_DIR/image.stamp" 2>/dev/null || true)
	if [ "$stamp_new" = "$stamp_old" ] && [ -f "$LAB_DIR/vmlinuz" ] && [ -f "$LAB_DIR/initramfs.img" ]; then
		info "guest image: up to date"
		return
	fi
	say "building the guest initramfs"
	local root="$build/root"
	rm -rf "$root"
	mkdir -p "$root"/{bin,dev,proc,sys,etc,tmp,run,lib/modules}
	cp "$busybox" "$root/bin/busybox"
	for bin in $("$busybox" --list); do
		[ "$bin" = busybox ] || ln -s busybox "$root/bin/$bin"
	done
	ln -s bin "$root/sbin"
	cp "$build/remora-guest" "$root/bin/remora-guest"
	install -m 0755 "$SCRIPT_DIR/guest-init.sh" "$root/init"
	find "$KERNEL_DIR/modules" -name '*.ko' -exec cp {} "$root/lib/modules/" \;
	cp "$KERNEL_DIR/modules.list" "$root/etc/remora-modules"
	# /dev/console lets the kernel give /init its stdio before devtmpfs is
	# mounted; /init reopens it after mounting, so it is not fatal if mknod
	# is not permitted here.
	mknod -m 600 "$root/dev/console" c 5 1 || info "warning: cannot mknod dev/console (early init output lost)"
	(cd "$root" && find . -print0 | sort -z | cpio --quiet -o -0 -H newc --reproducible -R 0:0) |
		gzip -1 >"$LAB_DIR/initramfs.img.new"
	cp "$KERNEL_DIR/vmlinuz" "$LAB_DIR/vmlinuz.new"
	mv "$LAB_DIR/vmlinuz.new" "$LAB_DIR/vmlinuz"
	mv "$LAB_DIR/initramfs.img.new" "$LAB_DIR/initramfs.img"
	echo "$name $ver" >"$LAB_DIR/kernel.version"
	echo "$stamp_new" >"$LAB_DIR/image.stamp"
	rm -rf "$root"
	info "initramfs: $(du -h "$LAB_DIR/initramfs.img" | cut -f1), kernel: $(du -h "$LAB_DIR/vmlinuz" | cut -f1)"
}

file_is_static() {
	# ldd fails on a static executable ("not a dynamic executable").
	[ -x "$1" ] && ! ldd "$1" >/dev/null 2>&1
}

# ---------------------------------------------------------------- domains

lab_domains() {
	local d
	for d in $(virsh_ list --all --name 2>/dev/null); do
		if virsh_ metadata "$d" --uri "$LAB_METADATA_URI" >/dev/null 2>&1; then
			echo "$d"
		fi
	done
}

remove_lab_domains() {
	libvirt_up || {
		info "libvirt not running: no domains to remove"
		return
	}
	local d
	for d in $(lab_domains); do
		virsh_ destroy "$d" >/dev/null 2>&1 || true
		virsh_ undefine "$d" >/dev/null 2>&1 || true
		info "removed domain $d"
	done
}

# ---------------------------------------------------------------- commands

print_env() {
	local spec ns ip veth var
	cat <<EOF
REMORA_LAB_DIR=$LAB_DIR
REMORA_LAB_KERNEL=$LAB_DIR/vmlinuz
REMORA_LAB_INITRD=$LAB_DIR/initramfs.img
REMORA_LAB_CONSOLE_DIR=$LAB_DIR/console
REMORA_LAB_LIBVIRT_URI=$LIBVIRT_URI
REMORA_LAB_MEMORY_BACKING_DIR=$MEMORY_BACKING_DIR
REMORA_LAB_AGENT_RUN_DIR=$AGENT_RUN_DIR
REMORA_LAB_BRIDGE=$BRIDGE
REMORA_LAB_BRIDGE_IP=$BRIDGE_IP
REMORA_LAB_PREFIX=$PREFIX
REMORA_LAB_GUEST_IP_FIRST=$GUEST_IP_FIRST
REMORA_LAB_GUEST_PORT=$GUEST_PORT
EOF
	for spec in "${NAMESPACES[@]}"; do
		IFS=: read -r ns ip veth <<<"$spec"
		var=${ns#rm-}
		var=${var^^}
		echo "REMORA_LAB_NS_$var=$ns"
		echo "REMORA_LAB_IP_$var=$ip"
	done
}

summary() {
	local spec ns ip veth
	say "lab is up"
	info "image:    $LAB_DIR/vmlinuz, $LAB_DIR/initramfs.img ($(cat "$LAB_DIR/kernel.version"))"
	info "libvirt:  $LIBVIRT_URI, guest RAM files under $MEMORY_BACKING_DIR"
	info "bridge:   $BRIDGE $BRIDGE_IP/$PREFIX (guests from $GUEST_IP_FIRST, workload port $GUEST_PORT)"
	for spec in "${NAMESPACES[@]}"; do
		IFS=: read -r ns ip veth <<<"$spec"
		info "netns:    $ns $ip (veth $veth)"
	done
	info "next:     REMORA_LAB=1 go test ./test/labkit/ -run Lab -v"
}

cmd_up() {
	need_root up
	local t0=$SECONDS
	say "remora lab up (lab dir $LAB_DIR)"
	ensure_packages
	ensure_qemu_conf
	ensure_kvm_node
	ensure_libvirt_hook
	ensure_daemons
	ensure_network
	ensure_image
	summary
	info "done in $((SECONDS - t0))s"
}

cmd_node() {
	need_root node
	local t0=$SECONDS
	say "remora lab node (lab dir $LAB_DIR)"
	ensure_packages
	ensure_qemu_conf
	ensure_kvm_node
	ensure_daemons
	ensure_image
	info "image:    $LAB_DIR/vmlinuz, $LAB_DIR/initramfs.img ($(cat "$LAB_DIR/kernel.version"))"
	info "done in $((SECONDS - t0))s"
}

cmd_down() {
	need_root down
	say "remora lab down"
	remove_lab_domains
	teardown_network
	info "kept: $LAB_DIR (image cache) and $QEMU_CONF settings"
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
env) print_env ;;
node) cmd_node ;;
*)
	echo "usage: $0 up|down|env|node" >&2
	exit 2
	;;
esac
