#!/bin/busybox sh
# /init of the ipvs VM test. The VM is the node; backends and the client live in
# network namespaces. Prints "IPVS-TEST PASS|FAIL name" lines, then "IPVS-TEST DONE",
# and powers off.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /var && ln -s /run /var/run
# busybox sh runs its own applets before PATH: use iproute2's ip (netns support).
ip() { /usr/sbin/ip "$@"; }
for m in $(cat /modules.list); do insmod "/lib/modules/$m" 2>/dev/null; done

pass() { echo "IPVS-TEST PASS $1"; }
fail() { echo "IPVS-TEST FAIL $1: $2"; }
diag() {
    echo "--- diagnostics"
    echo "direct: $(get 10.244.1.2:8080)"
    printf 'GET / HTTP/1.0\r\n\r\n' | ip netns exec client nc -w 3 10.96.0.10 80
    wget -T 3 -O - http://10.244.1.2:8080/
    ip -br addr; ip route show table local | grep -v 127.0; ip -n client route
    cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/vs/conntrack
    nft list ruleset
}
finish() {
    echo "--- kube-proxy log"; tail -n 40 /tmp/kp.log
    echo "--- /proc/net/ip_vs"; cat /proc/net/ip_vs
    echo "IPVS-TEST DONE"
    poweroff -f
}
# HTTP/1.0 GET with busybox nc; prints the body's single line (the backend's name).
get() {
    printf 'GET / HTTP/1.0\r\n\r\n' | ip netns exec client nc -w 3 ${1%:*} $(port_of "$1") 2>/dev/null | tail -n 1
}
port_of() { case "$1" in *:*) echo "${1#*:}" ;; *) echo 80 ;; esac; }
spread() {
    out=""
    i=0
    while [ "$i" -lt "$2" ]; do out="$out $(get "$1")"; i=$((i + 1)); done
    echo "$out"
}
# weights VS_HEX RS_HEX: weights of one real server under one virtual server.
weights() {
    awk -v vs="$1" -v rs="$2" '$1 == "TCP" {cur = $2} $1 == "->" && cur == vs && $2 == rs {print $4}' /proc/net/ip_vs
}

ip link set lo up
n=0
for ns in be0 be1 client; do
    ip netns add $ns
    ip -n $ns link set lo up
done
setup() { # ns node-ip peer-ip
    ip link add "v-$1" type veth peer name eth0 netns "$1"
    ip addr add "$2/24" dev "v-$1"
    ip link set "v-$1" up
    ip -n "$1" addr add "$3/24" dev eth0
    ip -n "$1" link set eth0 up
    ip -n "$1" route add default via "$2"
}
setup be0 10.244.1.1 10.244.1.2
setup be1 10.244.2.1 10.244.2.2
setup client 192.168.100.1 192.168.100.2
setup6() { # ns node-ip peer-ip (nodad: usable at once)
    ip addr add "$2/64" dev "v-$1" nodad
    ip -n "$1" addr add "$3/64" dev eth0 nodad
    ip -n "$1" -6 route add default via "$2"
}
setup6 be0 fd00:244:1::1 fd00:244:1::2
setup6 be1 fd00:244:2::1 fd00:244:2::2
setup6 client fd00:100::1 fd00:100::2
echo 1 > /proc/sys/net/ipv6/conf/all/forwarding
ip netns exec be0 httpd -p 8080 -h /www/be0
ip netns exec be1 httpd -p 8080 -h /www/be1

# Only the tools ipvs mode still runs (testkit's MODE_TOOLS): anything else it tried
# to exec would fail.
PATH=/proxy-tools /usr/bin/kube-proxy --proxy-mode=ipvs --manifests /m --hostname-override node \
    --cluster-cidr 10.244.0.0/16 --ipvs-sync-period 2s --ipvs-min-sync-period 0s \
    --ipvs-scheduler rr --ipvs-tcp-timeout 900s --ipvs-udp-timeout 60s > /tmp/kp.log 2>&1 &
kp=$!

ready=""
i=0
while [ $i -lt 20 ]; do
    case "$(get 10.96.0.10)" in be*) ready=1; break ;; esac
    sleep 0.5
    i=$((i + 1))
done
[ -n "$ready" ] || { fail ready "10.96.0.10 never answered"; diag; finish; }

answers=$(spread 10.96.0.10 6)
case "$answers" in *be0*be1*|*be1*be0*) pass clusterip ;; *) fail clusterip "$answers" ;; esac
answers=$(spread 192.168.100.1:30080 6)
case "$answers" in *be0*be1*|*be1*be0*) pass nodeport ;; *) fail nodeport "$answers" ;; esac
answers=$(spread 10.96.0.11 6)
first=$(get 10.96.0.11)
case "$first" in
    be*) if [ "$(echo "$answers" | tr ' ' '\n' | grep -v '^$' | sort -u)" = "$first" ]; then pass affinity; else fail affinity "$answers"; fi ;;
    *) fail affinity "no answer" ;;
esac
# /proc/net/ip_vs prints IPv6 addresses uncompressed.
if grep -q "^TCP  \[fd00:0096:0000:0000:0000:0000:0000:0010\]:0050 rr" /proc/net/ip_vs &&
    [ "$(grep -c -- "-> \[fd00:0244:" /proc/net/ip_vs)" = 2 ]; then
    pass ipv6-programmed
else
    fail ipv6-programmed "no IPv6 virtual server with two real servers: $(grep -i fd00 /proc/net/ip_vs)"
fi
answers=""
i=0
while [ $i -lt 6 ]; do
    answers="$answers $(printf 'GET / HTTP/1.0\r\n\r\n' | ip netns exec client nc -w 3 fd00:96::10 80 2>/dev/null | tail -n 1)"
    i=$((i + 1))
done
case "$answers" in *be0*be1*|*be1*be0*) pass clusterip-v6 ;; *) fail clusterip-v6 "$answers" ;; esac
grep -q "^TCP  0A60000A:0050 rr" /proc/net/ip_vs && pass scheduler || fail scheduler "no rr virtual server"
grep -q "^TCP  0A60000B:0050 rr  *persistent " /proc/net/ip_vs && pass persistence || fail persistence "no persistent virtual server"

# Remove 10.244.2.2 from web: its real server stays at weight 0 while its (TIME_WAIT)
# connections drain, and new connections go to 10.244.1.2 only.
cp /cluster-drained.yaml /m/cluster.yaml
i=0
w=""
while [ $i -lt 40 ]; do
    w=$(weights 0A60000A:0050 0AF40202:1F90)
    [ "$w" = "0" ] && break
    sleep 0.25
    i=$((i + 1))
done
[ "$w" = "0" ] && pass drain-weight-zero || fail drain-weight-zero "weight '$w'"
# The NodePort's server on 10.244.2.1 never had a connection to 10.244.2.2: a later
# sync reads its counters back (GET_DEST) and deletes it.
i=0
while [ $i -lt 40 ]; do
    [ -z "$(weights 0AF40201:7580 0AF40202:1F90)" ] && break
    sleep 0.25
    i=$((i + 1))
done
[ -z "$(weights 0AF40201:7580 0AF40202:1F90)" ] && pass drain-delete-idle || fail drain-delete-idle "still there"
[ "$(weights 0A60000A:0050 0AF40202:1F90)" = "0" ] && pass drain-keeps-busy || fail drain-keeps-busy "gone while connections remain"
answers=$(spread 10.96.0.10 4)
case "$answers" in *be1*|"") fail drain-new-connections "$answers" ;; *) pass drain-new-connections ;; esac
# The endpoint change went through a partial sync (diffed against memory, no dump).
grep -q "synced rules full=false" /tmp/kp.log && pass incremental || fail incremental "no partial sync logged"

kill $kp
wait $kp 2>/dev/null
if PATH=/proxy-tools /usr/bin/kube-proxy --cleanup > /tmp/cleanup.log 2>&1; then
    if [ -e /sys/class/net/kube-ipvs0 ]; then
        fail cleanup "kube-ipvs0 still exists"
    elif grep -q "^TCP" /proc/net/ip_vs; then
        fail cleanup "virtual servers left"
    elif nft list tables | grep -q kube-proxy-ipvs; then
        fail cleanup "nftables table left"
    else
        pass cleanup
    fi
else
    fail cleanup "$(cat /tmp/cleanup.log)"
fi
finish
