# In L2, run by L1 through `nestvm vm exec`: takes an address for eth0 (a
# `--net user` adapter, passt behind it) by DHCP with busybox's udhcpc, and
# prints the lease as "addr=IP router=IP". Exits with udhcpc's status.
cat >/tmp/udhcpc.sh <<'SCRIPT'
#!/bin/sh
case "$1" in
bound | renew)
    ip addr add "$ip/$mask" dev "$interface"
    ip route add default via "$router" dev "$interface"
    echo "addr=$ip router=$router" >/tmp/lease
    ;;
esac
SCRIPT
chmod +x /tmp/udhcpc.sh
ip link set eth0 up
udhcpc -i eth0 -n -q -t 20 -T 1 -s /tmp/udhcpc.sh >/tmp/udhcpc.log 2>&1
rc=$?
cat /tmp/lease 2>/dev/null
exit $rc
