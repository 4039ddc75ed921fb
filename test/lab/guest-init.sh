#!/bin/sh
# /init of the remora lab guest (busybox initramfs built by test/lab/lab.sh).
# PID 1: mount the pseudo filesystems, load the virtio modules listed in
# /etc/remora-modules, configure eth0 from remora.ip= / remora.gw= on the
# kernel command line, then run the workload forever (restarted if it exits,
# so PID 1 never exits and the kernel never panics).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs tmpfs /dev
exec </dev/console >/dev/console 2>&1
echo "remora-init: up $(cut -d' ' -f1 /proc/uptime)s after boot"

# shellcheck disable=SC2013 # one module name per word
for m in $(cat /etc/remora-modules); do
	insmod "/lib/modules/$m.ko" || echo "remora-init: insmod $m failed"
done

ip='' gw=''
# shellcheck disable=SC2013 # the command line is words
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	remora.ip=*) ip="${arg#remora.ip=}" ;;
	remora.gw=*) gw="${arg#remora.gw=}" ;;
	esac
done
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
if [ ! -e /sys/class/net/eth0 ]; then
	echo "remora-init: no eth0 (virtio_net not loaded?)"
elif [ -n "$ip" ]; then
	ip addr add "$ip" dev eth0
	ip link set eth0 up
	[ -n "$gw" ] && ip route add default via "$gw"
	echo "remora-init: eth0 $ip gw ${gw:-none}"
else
	echo "remora-init: no remora.ip= on the kernel command line; eth0 left down"
fi

# A standard server for load generators (make bench): busybox httpd.
mkdir -p /www
echo "remora lab guest" >/www/index.html
httpd -p 80 -h /www && echo "remora-init: httpd on port 80"

echo "remora-init: starting workload $(cut -d' ' -f1 /proc/uptime)s after boot"
while :; do
	/bin/remora-guest
	echo "remora-init: workload exited with status $?; restarting in 1s"
	sleep 1
done
