#!/bin/bash -e
# An emulated cluster on one machine: one network namespace per MPI rank, each joined by a veth
# link to a bridge in a hub namespace, every link shaped with tc tbf (1 Gbit/s by default), and
# Open MPI over TCP between the namespaces.
#
#   benchmarks/netns_cluster.sh run [-n 8] [-r 1gbit] -- COMMAND...   # up, COMMAND, down (trap)
#   benchmarks/netns_cluster.sh up [-n 8] [-r 1gbit]                  # build it and leave it up
#   benchmarks/netns_cluster.sh mpirun -n M [-p R] [MPIRUN ARGS] PROGRAM...
#                                         # mpirun on its first M ranks, or R ranks a namespace
#   benchmarks/netns_cluster.sh down                                  # remove all of it
#   benchmarks/netns_cluster.sh status
#
# Inside `run`, COMMAND finds "$NETNS_MPIRUN" (this script's `mpirun` subcommand), e.g.
#
#   sudo benchmarks/netns_cluster.sh run -n 4 -- python benchmarks/run_collectives.py \
#       --ranks 2,3,4 --mpirun '$NETNS_MPIRUN' --json results/collectives_1gbit.json
#
# Layout (addresses only inside namespaces made here; nothing in the root namespace changes):
#   $PREFIX-hub   bridge br0 with $SUBNET.254 (mpirun's own address), veth v0..v{N-1}
#   $PREFIX-rI    veth "mpi0" with $SUBNET.(I+1)/24, one rank (or, with `mpirun -p R`, R ranks:
#                 a host of R ranks that talk to each other unshaped, over TCP inside it)
# Each namespace is a node: its ranks get MPISIGN_NODE=netns-rI, since all namespaces share one
# hostname and one /dev/shm, and MPI's shared-memory split would take them for one node.
# Each veth end carries `tc qdisc ... root tbf rate RATE burst 256kb latency 50ms`, so every rank
# has a RATE full-duplex link to the switch. netem is not in this kernel: no delay emulation.
#
# mpirun runs in the hub namespace; an ssh "agent" script maps each host address to
# `ip netns exec $PREFIX-rI` (PRTE_MCA_plm_ssh_agent), so PRRTE starts one daemon per namespace.
# Needs root (ip netns, tc) and Open MPI 5 (PRRTE).

PREFIX=${NETNS_PREFIX:-mpisign}
SUBNET=${NETNS_SUBNET:-10.231.0}          # a /24 that only these namespaces use
HUB=$PREFIX-hub
STATE=${NETNS_STATE:-/tmp/$PREFIX-netns}  # agent script and the size of the cluster
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")

die() { echo "netns_cluster: $*" >&2; exit 2; }

ranks_up() { cat "$STATE/ranks" 2>/dev/null || echo 0; }

up() {
    local n=$1 rate=$2
    [ "$(id -u)" = 0 ] || die "needs root (ip netns, tc)"
    [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "-n must be 1..200, got $n"
    ip netns list | grep -q "^$HUB\b" && die "$HUB exists: run '$0 down' first"
    mkdir -p "$STATE"
    echo "$n" > "$STATE/ranks"
    echo "$rate" > "$STATE/rate"
    ip netns add "$HUB"
    ip -n "$HUB" link set lo up
    ip -n "$HUB" link add br0 type bridge
    ip -n "$HUB" addr add "$SUBNET.254/24" dev br0
    ip -n "$HUB" link set br0 up
    for i in $(seq 0 $((n - 1))); do
        local ns=$PREFIX-r$i
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # One veth pair per rank: v$i on the hub's bridge, mpi0 in the rank's namespace.
        ip -n "$HUB" link add "v$i" type veth peer name mpi0 netns "$ns"
        ip -n "$HUB" link set "v$i" master br0 up
        ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev mpi0
        ip -n "$ns" link set mpi0 up
        # Shape both directions of the link: the rank's egress (mpi0) and the switch's (v$i).
        ip netns exec "$ns" tc qdisc add dev mpi0 root tbf rate "$rate" burst 256kb latency 50ms
        ip netns exec "$HUB" tc qdisc add dev "v$i" root tbf rate "$rate" burst 256kb latency 50ms
    done
    # The ssh agent PRRTE runs instead of ssh: "agent [options] HOST COMMAND" -> the namespace.
    cat > "$STATE/agent.sh" <<EOF
#!/bin/sh
while [ \$# -gt 0 ]; do case "\$1" in -*) shift ;; *) break ;; esac; done
host=\$1; shift
case "\$host" in
    $SUBNET.*) i=\$((\${host##*.} - 1)) ;;
    *) echo "netns agent: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec $PREFIX-r\$i env MPISIGN_NODE=netns-r\$i /bin/sh -c "\$*"
EOF
    chmod +x "$STATE/agent.sh"
    # Wait until every link is up (a veth comes up within milliseconds; be sure anyway).
    for i in $(seq 0 $((n - 1))); do
        local tries=0
        until ip -n "$PREFIX-r$i" link show mpi0 | grep -q "state UP"; do
            tries=$((tries + 1)); [ $tries -lt 50 ] || die "link of rank namespace $i stays down"
            sleep 0.1
        done
    done
    echo "netns_cluster: $n ranks up, links $rate, subnet $SUBNET.0/24" >&2
}

down() {
    local ns
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$PREFIX-(hub|r[0-9]+)$" || true); do
        # Kill what still runs in it (only processes inside these namespaces), then delete it.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$STATE"
}

mpirun_in_hub() {
    [ "$1" = "-n" ] || die "usage: $0 mpirun -n M [-p R] PROGRAM..."
    local m=$2 per=1; shift 2
    if [ "${1:-}" = "-p" ]; then per=$2; shift 2; fi
    [ "$per" -ge 1 ] || die "-p must be >= 1, got $per"
    local n; n=$(ranks_up)
    local used=$(((m + per - 1) / per))
    [ "$m" -ge 1 ] && [ "$used" -le "$n" ] || die "-n $m -p $per: the cluster has $n namespaces up"
    local hosts=""
    for i in $(seq 0 $((used - 1))); do hosts="$hosts${hosts:+,}$SUBNET.$((i + 1)):$per"; done
    local pml=ob1
    case "${OMPI_MCA_pml_monitoring_enable:-0}" in 0) ;; *) pml=ob1,monitoring ;; esac
    local mpirun; mpirun=$(dirname "$(command -v python)")/mpirun
    [ -x "$mpirun" ] || mpirun=$(command -v mpirun) || die "no mpirun on PATH"
    local settings=(
        # PRRTE starts its daemons through the agent, one in each rank's namespace.
        PRTE_MCA_plm_ssh_agent="$STATE/agent.sh"
        # Runtime and MPI traffic only on the emulated links.
        PRTE_MCA_oob_tcp_if_include="$SUBNET.0/24"
        PMIX_MCA_ptl_tcp_if_include="$SUBNET.0/24"
        OMPI_MCA_oob_tcp_if_include="$SUBNET.0/24"
        OMPI_MCA_btl_tcp_if_include="$SUBNET.0/24"
        # TCP between ranks, never shared memory; pml/monitoring (exact bytes of MPI's
        # collectives) must be named beside ob1 when it is enabled.
        OMPI_MCA_btl=tcp,self
        OMPI_MCA_pml="$pml"
        # TCP connections per pair of ranks: Open MPI's default 1 unless exported (2 lifts the
        # halved throughput of two ranks sending to each other at once).
        OMPI_MCA_btl_tcp_links="${OMPI_MCA_btl_tcp_links:-1}"
        # All namespaces report one hostname: coll/han and coll/sm would take the ranks for one
        # node and return WRONG results.
        "OMPI_MCA_coll=^han,sm"
        # 2 cores: ranks yield instead of busy-polling, one compute thread each.
        OMPI_MCA_mpi_yield_when_idle=1
        OMP_NUM_THREADS=1
        MKL_NUM_THREADS=1
        OMPI_ALLOW_RUN_AS_ROOT=1
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        # torch.distributed (gloo) opens its TCP pairs on the emulated link too.
        GLOO_SOCKET_IFNAME=mpi0
        NETNS_RATE="$(cat "$STATE/rate")"
        PYTHONUNBUFFERED=1
    )
    # The daemons inherit this environment through the agent, and the ranks through them.
    # Ranks fill one namespace's slots before the next: ranks 0..R-1 on the first, and so on.
    exec ip netns exec "$HUB" env "${settings[@]}" "$mpirun" --host "$hosts" -n "$m" \
        --map-by slot --bind-to none "$@"
}

parse_up_args() {
    N=8; RATE=1gbit
    while [ $# -gt 0 ]; do
        case "$1" in
            -n) N=$2; shift 2 ;;
            -r|--rate) RATE=$2; shift 2 ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    REST=("$@")
}

cmd=${1:-}; shift || true
case "$cmd" in
    up) parse_up_args "$@"; up "$N" "$RATE" ;;
    down) down ;;
    mpirun) mpirun_in_hub "$@" ;;
    status)
        ip netns list | grep -E "^$PREFIX-" || echo "no $PREFIX namespaces"
        [ -f "$STATE/ranks" ] && echo "ranks $(cat "$STATE/ranks"), rate $(cat "$STATE/rate")"
        ;;
    run)
        parse_up_args "$@"
        [ ${#REST[@]} -gt 0 ] || die "usage: $0 run [-n N] [-r RATE] -- COMMAND..."
        trap down EXIT INT TERM
        up "$N" "$RATE"
        export NETNS_MPIRUN="$SELF mpirun" NETNS_RATE="$RATE" NETNS_RANKS="$N"
        "${REST[@]}"
        ;;
    *) sed -n '2,30p' "$SELF" >&2; exit 2 ;;
esac
