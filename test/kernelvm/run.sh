#!/usr/bin/env bash
# Runs the tests that need kernel features this host may lack (sch_plug,
# ifb, act_mirred, soft-dirty) inside Debian's own kernel, booted under
# QEMU (TCG) with the test binaries in a busybox initramfs. The initramfs
# also carries this host's qemu-system-x86_64 (with its libraries and
# firmware), so that soft-dirty tracking is tested on a real QEMU guest
# inside the VM (nested TCG).
#
#   test/kernelvm/run.sh            # or: make test-kernel
#
# Environment:
#   REMORA_KERNELVM_CACHE    cache dir (default /var/tmp/remora-kernelvm):
#                            the kernel package is fetched once per version
#   REMORA_KERNELVM_TIMEOUT  seconds before the VM is killed (default 600)
#   REMORA_KERNELVM_RUN      extra -test.run pattern for both binaries
#   REMORA_KERNELVM_BENCH    a -test.bench pattern for checkpoint.test
#                            (make bench-kernel): benchmarks instead of tests
#
# Installs qemu-system-x86, busybox-static, cpio and xz-utils with
# apt-get when missing (needs root then). Exits 0 only when
# the VM printed the PASS marker.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
CACHE=${REMORA_KERNELVM_CACHE:-/var/tmp/remora-kernelvm}
TIMEOUT=${REMORA_KERNELVM_TIMEOUT:-600}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
# Modules the tests need; their dependencies are added from modinfo.
MODULES=(tun ifb sch_plug sch_ingress cls_matchall act_mirred)
PASS_MARK="REMORA-KERNELVM: PASS"
FAIL_MARK="REMORA-KERNELVM: FAIL"

say() { echo "kernelvm: $*" >&2; }
die() {
	echo "kernelvm: FAIL: $*" >&2
	exit 1
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

ensure_packages() {
	local p missing=()
	for p in qemu-system-x86 busybox-static cpio xz-utils; do
		installed "$p" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return
	[ "$(id -u)" = 0 ] || die "missing packages ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
	say "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update >&2 || die "apt-get update failed"
	APT_UPDATED=1
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
		die "apt-get install ${missing[*]} failed"
}

# kernel_package prints "<name> <version>" of the kernel that
# linux-image-amd64 depends on (as test/lab/lab.sh does).
kernel_package() {
	if ! apt-cache show linux-image-amd64 >/dev/null 2>&1 && [ -z "${APT_UPDATED:-}" ]; then
		say "apt-get update (no package lists for linux-image-amd64)"
		DEBIAN_FRONTEND=noninteractive apt-get update >&2 || die "apt-get update failed"
		APT_UPDATED=1
	fi
	local name ver
	name=$(apt-cache depends linux-image-amd64 2>/dev/null |
		awk '!found && $1 == "Depends:" && $2 ~ /^linux-image-[0-9.]+-[0-9]+-amd64$/ { print $2; found = 1 }')
	[ -n "$name" ] || die "linux-image-amd64 has no linux-image-*-amd64 dependency (is this Debian with main in sources.list?)"
	ver=$(apt-cache policy "$name" | awk '/Candidate:/ {print $2}')
	[ -n "$ver" ] && [ "$ver" != "(none)" ] || die "package $name has no installable candidate"
	echo "$name $ver"
}

# modinfo_depends prints the depends= field of a module file.
modinfo_depends() {
	tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | tr ',' ' '
}

# ensure_kernel fetches the package into $CACHE/kernel/<name>_<ver>/ and
# keeps vmlinuz and the needed modules (decompressed) in load order.
ensure_kernel() {
	local name=$1 ver=$2 dir tmp deb kver root m f
	dir="$CACHE/kernel/${name}_${ver}"
	KERNEL_DIR=$dir
	if [ -f "$dir/.complete" ]; then
		say "kernel $name $ver (cached)"
		return
	fi
	say "fetching $name $ver"
	mkdir -p "$CACHE/kernel"
	tmp=$(mktemp -d "$CACHE/tmp.XXXXXX")
	(cd "$tmp" && apt-get download -o APT::Sandbox::User=root "$name=$ver" >&2) ||
		die "apt-get download $name=$ver failed (network access to the Debian mirror?)"
	deb=$(ls "$tmp"/*.deb)
	dpkg-deb -x "$deb" "$tmp/root"
	kver=${name#linux-image-}
	root="$tmp/root/lib/modules/$kver"
	[ -f "$tmp/root/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $deb"
	rm -rf "$dir.new"
	mkdir -p "$dir.new/modules"
	cp "$tmp/root/boot/vmlinuz-$kver" "$dir.new/vmlinuz"
	: >"$dir.new/modules.order"
	declare -A seen=()
	add_module() { # depth first: dependencies before the module
		local m=$1 f d
		[ -n "${seen[$m]:-}" ] && return
		seen[$m]=1
		if grep -Eq "/$m\.ko(\.[a-z]+)?\$" "$root/modules.builtin" 2>/dev/null; then
			return # built in
		fi
		f=$(find "$root/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)
		[ -n "$f" ] || die "module $m is neither built in nor in $deb"
		case $f in
		*.xz) xz -dc "$f" >"$dir.new/modules/$m.ko" ;;
		*.zst) zstd -dc "$f" >"$dir.new/modules/$m.ko" ;;
		*) cp "$f" "$dir.new/modules/$m.ko" ;;
		esac
		for d in $(modinfo_depends "$dir.new/modules/$m.ko"); do
			add_module "${d//-/_}"
		done
		echo "$m" >>"$dir.new/modules.order"
	}
	for m in "${MODULES[@]}"; do add_module "$m"; done
	echo "$name $ver" >"$dir.new/.complete"
	rm -rf "$dir" "$tmp"
	mv "$dir.new" "$dir"
	say "kernel cached in $dir: modules $(tr '\n' ' ' <"$dir/modules.order")"
}

build_tests() {
	local out=$1
	say "building test binaries with $("$GO" version | awk '{print $3}')"
	(cd "$REPO_DIR" && CGO_ENABLED=0 "$GO" test -c -o "$out/checkpoint.test" ./checkpoint) ||
		die "go test -c ./checkpoint failed"
	# outcommit is pure Go (QMP through migrate/qemu): a static binary
	# without cgo.
	(cd "$REPO_DIR" && CGO_ENABLED=0 "$GO" test -c -o "$out/outcommit.test" ./checkpoint/outcommit) ||
		die "go test -c ./checkpoint/outcommit failed"
}

# add_qemu copies qemu-system-x86_64, its TCG module, the libraries they
# load and the firmware a pc machine boots with into root $1.
add_qemu() {
	local r=$1 bin f lib
	bin=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 missing"
	mkdir -p "$r/usr/bin" "$r/usr/share/qemu" "$r/usr/share/seabios" "$r/usr/lib/x86_64-linux-gnu/qemu"
	cp "$bin" "$r/usr/bin/"
	cp /usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so "$r/usr/lib/x86_64-linux-gnu/qemu/"
	for f in "$bin" /usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so; do
		for lib in $(ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
			mkdir -p "$r$(dirname "$lib")"
			cp -L "$lib" "$r$lib"
		done
	done
	for f in kvmvapic.bin linuxboot_dma.bin multiboot_dma.bin; do
		cp -L "/usr/share/qemu/$f" "$r/usr/share/qemu/"
	done
	cp -L /usr/share/seabios/bios-256k.bin "$r/usr/share/seabios/"
}

build_initramfs() {
	local work=$1 img=$2 r=$1/root
	rm -rf "$r"
	mkdir -p "$r"/{bin,dev,proc,sys,tmp,lib/modules}
	cp /bin/busybox "$r/bin/busybox"
	add_qemu "$r"
	cp "$work/checkpoint.test" "$work/outcommit.test" "$r/bin/"
	cp "$KERNEL_DIR"/modules/*.ko "$r/lib/modules/"
	cp "$KERNEL_DIR/modules.order" "$r/modules.order"
	cat >"$r/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
ip link set lo up
for m in \$(cat /modules.order); do
	insmod /lib/modules/\$m.ko || echo "kernelvm: insmod \$m failed"
done
export REMORA_REQUIRE_KERNEL_FEATURES=1 TMPDIR=/tmp HOME=/tmp PATH=/bin:/usr/bin REMORA_TEST_LOG=${REMORA_TEST_LOG:-}
echo "kernelvm: kernel \$(uname -r), \$(nproc) CPUs"
rc=0
cd /tmp
/bin/outcommit.test -test.v -test.count=1 -test.timeout=8m -test.run '${RUN_PLUG}' || rc=1
/bin/checkpoint.test -test.v -test.count=1 -test.timeout=8m -test.run '${RUN_SOFTDIRTY}' ${BENCH_ARGS} || rc=1
if [ \$rc = 0 ]; then echo "${PASS_MARK}"; else echo "${FAIL_MARK}"; fi
poweroff -f
EOF
	chmod +x "$r/init"
	(cd "$r" && find . | cpio -o -H newc --quiet >"$img") || die "cpio failed"
}

main() {
	local start kpkg name ver work img log rc
	start=$(date +%s)
	ensure_packages
	kpkg=$(kernel_package)
	read -r name ver <<<"$kpkg"
	ensure_kernel "$name" "$ver"
	RUN_PLUG='Plug'
	RUN_SOFTDIRTY='SoftDirty|TinyGuest'
	BENCH_ARGS=
	if [ -n "${REMORA_KERNELVM_RUN:-}" ]; then
		RUN_PLUG=$REMORA_KERNELVM_RUN
		RUN_SOFTDIRTY=$REMORA_KERNELVM_RUN
	fi
	if [ -n "${REMORA_KERNELVM_BENCH:-}" ]; then
		RUN_PLUG='^$'
		RUN_SOFTDIRTY='^$'
		BENCH_ARGS="-test.bench '${REMORA_KERNELVM_BENCH}' -test.benchtime 20x"
	fi
	work=$(mktemp -d "${TMPDIR:-/tmp}/remora-kernelvm.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	build_tests "$work"
	img="$work/initramfs.cpio"
	build_initramfs "$work" "$img"
	log="$work/console.log"
	say "booting $name under QEMU (TCG), timeout ${TIMEOUT}s"
	rc=0
	timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 -accel tcg -m 2G -smp 2 -nographic -no-reboot -nic none \
		-kernel "$KERNEL_DIR/vmlinuz" -initrd "$img" \
		-append 'console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init' </dev/null 2>&1 |
		tr -d '\r' | tee "$log" || rc=$?
	local took=$(($(date +%s) - start))
	if grep -qx "$PASS_MARK" "$log"; then
		say "PASS in ${took}s"
		exit 0
	fi
	if [ "$rc" = 124 ] || ! grep -qx "$FAIL_MARK" "$log"; then
		echo "kernelvm: FAIL: no result from the VM within ${TIMEOUT}s (qemu exit $rc); console tail:" >&2
		tail -n 40 "$log" >&2
		exit 1
	fi
	echo "kernelvm: FAIL after ${took}s; failures:" >&2
	grep -E -- '^(--- FAIL|FAIL|panic:)|_test\.go:[0-9]+:' "$log" | head -n 40 >&2
	exit 1
}

main "$@"
