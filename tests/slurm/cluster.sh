#!/bin/bash -e
# A real one-node Slurm cluster on this machine, from Debian's packages, for CI and tests.
#
#   bash tests/slurm/cluster.sh install   # apt-get install slurm-wlm munge libpmix2 libpmix-dev
#   bash tests/slurm/cluster.sh start     # write the config, start munged, slurmctld, slurmd
#   bash tests/slurm/cluster.sh stop      # stop them, by the PIDs in their pid files
#   bash tests/slurm/cluster.sh status    # sinfo, and which daemons run
#   eval "$(bash tests/slurm/cluster.sh env)"   # SLURM_CONF, PMIX_MCA_psec for callers
#
# Everything lives under $MPISIGN_SLURM_DIR (default /tmp/mpisign-slurm): slurm.conf, the
# controller's state, slurmd's spool, logs, pid files, munge's socket and key. Nothing is
# written under /etc. Every Slurm command finds the config through SLURM_CONF, which `env`
# prints. The node offers 4 CPUs whatever the machine has (SlurmdParameters=config_overrides),
# so that `srun -n 4` runs on a 2-core machine. MpiDefault stays `none`, Slurm's shipped
# default: a caller that wants PMIx must ask for it (`srun --mpi=pmix`). Needs root.
set -o pipefail

DIR=${MPISIGN_SLURM_DIR:-/tmp/mpisign-slurm}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
CPUS=${MPISIGN_SLURM_CPUS:-4}
START_TIMEOUT=${MPISIGN_SLURM_START_TIMEOUT:-60}
MUNGE_SOCKET=$DIR/munge/munge.socket.2
MUNGE_KEY=$DIR/munge/munge.key
MUNGE_PID=$DIR/munge/munged.pid
export SLURM_CONF=$CONF

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root"
}

# alive PID: the process PID runs. A zombie does not count: this machine's init reaps
# orphans only about a second after they exit, and kill -0 succeeds on a zombie.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# pid_alive FILE: the process named in the pid file FILE runs.
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ -n "$pid" ] && alive "$pid"
}

# our_stepds: the PIDs of slurmstepd processes of this cluster (their working directory
# is this cluster's log directory, where slurmd put them), not those of any other Slurm.
our_stepds() {
    local p
    for p in $(pgrep -x slurmstepd || true); do
        [ "$(readlink "/proc/$p/cwd" 2>/dev/null)" = "$DIR/log" ] && echo "$p"
    done
}

# descendants PID...: the PIDs of all descendants of the given processes.
descendants() {
    local p c
    for p in "$@"; do
        while read -r c; do
            echo "$c"
            descendants "$c"
        done < <(pgrep -P "$p" || true)
    done
}

# stop_pid FILE NAME: SIGTERM the process in FILE, wait up to 10 s, then SIGKILL it.
stop_pid() {
    local file=$1 name=$2 pid i
    if ! pid_alive "$file"; then
        rm -f "$file"
        return 0
    fi
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        echo "cluster.sh: $name ($pid) ignored SIGTERM for 10 s; SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$file"
    echo "stopped $name ($pid) after ${i}00 ms" >&2
}

cmd_install() {
    need_root
    if command -v slurmctld >/dev/null && command -v munged >/dev/null &&
        [ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/mpi_pmix.so ] &&
        ls /usr/lib/x86_64-linux-gnu/libpmix.so >/dev/null 2>&1; then
        echo "slurm-wlm, munge and libpmix are installed" >&2
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq -o Dpkg::Use-Pty=0 slurm-wlm munge libpmix2 libpmix-dev >/dev/null
    # The packages' services are not wanted: this script runs its own daemons. Without
    # systemd (containers) the postinst starts nothing; with it, stop what it started.
    if [ -d /run/systemd/system ]; then
        systemctl disable --now slurmctld slurmd munge >/dev/null 2>&1 || true
    fi
    echo "installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm)" >&2
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/munge"
    cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster.
ClusterName=mpisign
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
ReturnToService=2
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobRequeue=1
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=2
MinJobAge=30
InactiveLimit=0
WaitTime=0
MessageTimeout=10
SlurmdTimeout=60
# A requeued job is held cred_expire+1 s (above), then waits for a scheduling pass: with
# the defaults (sched_interval=60, bf_interval=30) about 30 s more, with these about 0.
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=1
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    if pid_alive "$MUNGE_PID"; then
        return 0
    fi
    if [ ! -s "$MUNGE_KEY" ]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    # munged runs as the munge user, as Debian's service does, and insists that its key,
    # socket, pid, log and seed files lie in directories that only it (or root) may write.
    chown -R munge:munge "$DIR/munge"
    chmod 0755 "$DIR/munge"
    chmod 0400 "$MUNGE_KEY"
    runuser -u munge -- munged --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_PID" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        || die "munged failed to start; see $DIR/munge/munged.log"
    local i
    for i in $(seq 50); do
        [ -S "$MUNGE_SOCKET" ] && break
        sleep 0.1
    done
    munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET" >/dev/null \
        || die "munge does not work; see $DIR/munge/munged.log"
}

# node_state: the node's state as sinfo prints it (idle, idle*, down, ...), or nothing.
node_state() {
    sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1
}

cmd_start() {
    need_root
    command -v slurmctld >/dev/null || die "Slurm is not installed: run '$0 install' first"
    local state
    if pid_alive "$MUNGE_PID" && pid_alive "$DIR/run/slurmctld.pid" &&
        pid_alive "$DIR/run/slurmd.pid"; then
        state=$(node_state)
        case $state in
            idle|mixed|allocated|completing)
                echo "the cluster runs already: node $NODE $state" >&2
                return 0
                ;;
        esac
    fi
    mkdir -p "$DIR"
    write_conf
    start_munge
    if ! pid_alive "$DIR/run/slurmctld.pid"; then
        # -c: a clean start, forgetting jobs of an earlier run; -i: ignore lost state files.
        slurmctld -c -i -f "$CONF" || die "slurmctld failed to start; see $DIR/log/slurmctld.log"
    fi
    if ! pid_alive "$DIR/run/slurmd.pid"; then
        slurmd -f "$CONF" || die "slurmd failed to start; see $DIR/log/slurmd.log"
    fi
    local waited=0
    state=
    while [ "$waited" -lt $((START_TIMEOUT * 10)) ]; do
        state=$(node_state)
        case $state in
            idle) break ;;
            down*|drain*|fail*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.2
        waited=$((waited + 2))
    done
    if [ "$state" != idle ]; then
        echo "cluster.sh: node $NODE is not idle after ${START_TIMEOUT}s (state: '${state:-none}')" >&2
        scontrol show node "$NODE" >&2 2>&1 || true
        tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
        exit 1
    fi
    echo "node $NODE idle, $CPUS CPUs, partition debug; SLURM_CONF=$CONF" >&2
}

cmd_stop() {
    need_root
    local jobs i
    local -a pids
    # Cancel the jobs first, so that slurmd's step daemons end their tasks.
    if pid_alive "$DIR/run/slurmctld.pid"; then
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086  # one job ID a word
            scancel $jobs 2>/dev/null || true
            for i in $(seq 100); do
                [ -z "$(our_stepds)" ] && break
                sleep 0.1
            done
        fi
    fi
    stop_pid "$DIR/run/slurmd.pid" slurmd
    stop_pid "$DIR/run/slurmctld.pid" slurmctld
    stop_pid "$MUNGE_PID" munged
    # Step daemons that outlived all that (slurmd gone first, or a job that ignores
    # SIGTERM), and their tasks: this cluster's own, found by their working directory.
    mapfile -t pids < <(our_stepds)
    if [ ${#pids[@]} -gt 0 ]; then
        mapfile -t -O ${#pids[@]} pids < <(descendants "${pids[@]}")
        echo "cluster.sh: killing leftover step daemons and tasks: ${pids[*]}" >&2
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
}

cmd_status() {
    local d
    for d in munge/munged run/slurmctld run/slurmd; do
        if pid_alive "$DIR/$d.pid"; then
            echo "${d#*/}: running ($(cat "$DIR/$d.pid"))"
        else
            echo "$d: stopped"
        fi
    done
    sinfo 2>&1 || true
}

cmd_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF"
    # PyPI's Open MPI otherwise asks PMIx for munge authentication and complains.
    echo 'export PMIX_MCA_psec=native'
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 install|start|stop|restart|status|env" >&2
        exit 2
        ;;
esac
