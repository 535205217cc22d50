#!/usr/bin/env bash
# Builds the initramfs for the ipvs VM test from the host's packages (busybox-static,
# linux-image-amd64, iproute2, nftables): our kube-proxy binary with its shared
# libraries, `ip`, `nft`, busybox, the kernel's IPVS/nftables/veth/dummy modules, the
# test's /init and manifests, and /proxy-tools: the PATH kube-proxy runs with, holding
# only TOOLS (the ones ipvs mode still runs; each must be one of those copied here).
# Prints the kernel image's path.
# Usage: build-initramfs.sh WORKDIR KUBE_PROXY_BINARY "TOOLS..."
set -euo pipefail
work=$1
binary=$2
tools=${3-}
here=$(cd "$(dirname "$0")" && pwd)

kernel=""
for k in /boot/vmlinuz-*; do
    version=${k#/boot/vmlinuz-}
    if [ -d "/lib/modules/$version/kernel/net/netfilter/ipvs" ]; then
        kernel=$k
        break
    fi
done
[ -n "$kernel" ] || { echo "no kernel with IPVS modules under /boot" >&2; exit 1; }

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib64,proc,sys,dev,tmp,run,m,www/be0,www/be1}
cp /bin/busybox "$root/bin/busybox"
# The debug binary is large; its debug info is of no use in the VM.
strip -o "$root/usr/bin/kube-proxy" "$binary"
cp "$(command -v ip)" "$root/usr/sbin/ip"
cp "$(command -v nft)" "$root/usr/sbin/nft"
for exe in "$root/usr/bin/kube-proxy" "$root/usr/sbin/ip" "$root/usr/sbin/nft"; do
    ldd "$exe" | awk '/=>/ {print $3} /^\s*\/lib64/ {print $1}' | while read -r lib; do
        [ -f "$lib" ] || continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
# The dynamic loader, wherever ldd names it.
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
mkdir -p "$root/proxy-tools"
for tool in $tools; do
    [ -x "$root/usr/sbin/$tool" ] || { echo "tool $tool is not in the initramfs" >&2; exit 1; }
    ln -s "/usr/sbin/$tool" "$root/proxy-tools/$tool"
done

# Modules in dependency order; failures to load (e.g. crc32c-intel without SSE4.2
# under TCG) are tolerated by /init.
: > "$root/modules.list"
for m in ip_vs ip_vs_rr ip_vs_lc ip_vs_sh dummy veth nf_tables nft_chain_nat nft_masq \
         nft_fib_ipv4 nft_fib_ipv6; do
    modprobe -S "$version" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r path; do
    name=$(basename "$path")
    case $name in
        *.xz) xz -dc "$path" > "$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
        *.zst) zstd -qdc "$path" > "$root/lib/modules/${name%.zst}"; name=${name%.zst} ;;
        *) cp "$path" "$root/lib/modules/$name" ;;
    esac
    echo "$name" >> "$root/modules.list"
done

cp "$here/init.sh" "$root/init"
chmod +x "$root/init"
cp "$here/cluster.yaml" "$root/m/cluster.yaml"
cp "$here/cluster-drained.yaml" "$root/cluster-drained.yaml"
echo be0 > "$root/www/be0/index.html"
echo be1 > "$root/www/be1/index.html"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initramfs.gz"
rm -rf "$root"
echo "$kernel"
