#!/bin/sh
# tenant-network.sh NAME PARENT ADDRESS/PREFIX [GATEWAY] [VLAN]
#
# Gives tenant NAME its own network: the namespace /run/netns/NAME (nstarget serves the tenant
# the moment it appears, and listens once the address below exists), an interface on the host's
# PARENT NIC moved into it as eth0 — a macvlan (bridge mode), or with VLAN a VLAN interface
# (802.1Q tag VLAN on PARENT) — with the tenant's address, loopback up, and a default route via
# GATEWAY if given. Tenants may use the same addresses: each lives in its own namespace.
#
# Undo: ip netns del NAME   (the interface goes with the namespace; PARENT is never touched)
set -eu
[ $# -ge 3 ] || { echo "usage: $0 NAME PARENT ADDRESS/PREFIX [GATEWAY] [VLAN]" >&2; exit 2; }
name=$1 parent=$2 addr=$3 gw=${4:-} vlan=${5:-}
tmp=tn$$ # a unique temporary name in the host namespace, for the moment before the move
ip link show "$parent" >/dev/null
ip netns add "$name"
trap 'ip link del "$tmp" 2>/dev/null; ip netns del "$name"' EXIT
ip -n "$name" link set lo up
if [ -n "$vlan" ]; then
	ip link add link "$parent" name "$tmp" type vlan id "$vlan"
else
	ip link add link "$parent" name "$tmp" type macvlan mode bridge
fi
ip link set "$tmp" netns "$name"
ip -n "$name" link set "$tmp" name eth0
ip -n "$name" addr add "$addr" dev eth0
ip -n "$name" link set eth0 up
[ -z "$gw" ] || ip -n "$name" route add default via "$gw"
trap - EXIT
