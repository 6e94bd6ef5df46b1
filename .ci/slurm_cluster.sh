#!/usr/bin/env bash
# A two-node SLURM cluster on this machine, from Debian's packages, for tests/test_slurm_cluster.py.
#   sudo bash .ci/slurm_cluster.sh start     # install slurm-wlm and munge if needed, start the daemons
#   sudo bash .ci/slurm_cluster.sh stop      # cancel its jobs, stop the daemons
# CPU only: each node claims 64 CPUs, 64 GB and 16 placeholder GPUs, so the job scripts' #SBATCH
# lines schedule unchanged, six two-GPU jobs at once. The first node is this machine; the second,
# unet-node-b, is a slurmd in its own network, UTS and mount namespaces, with its own address on a
# veth pair (10.77.0.2; this machine is 10.77.0.1 there), its own hostname and its own /etc/hosts.
# Where namespaces cannot be made, the cluster has the first node only. It refuses to touch a
# slurm.conf it did not write.
set -euo pipefail

CLUSTER_NAME=unet-test  # tests/test_slurm_cluster.py runs only against a controller of this name
CONF=/etc/slurm/slurm.conf
MARKER="# written by .ci/slurm_cluster.sh"
STATE=/var/lib/slurm-unet-test
LOGS=/var/log/slurm-unet-test
NODE_B=unet-node-b  # also the name of its network namespace
LINK=unet0          # the veth end's name on both sides: GLOO_SOCKET_IFNAME=unet0 serves every node
ADDR_A=10.77.0.1
ADDR_B=10.77.0.2

die() {
    echo "slurm_cluster: $*" >&2
    exit 1
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are missing and there is no apt-get to install them"
    echo "slurm_cluster: installing slurm-wlm and munge"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null ||
        die "apt-get could not install slurm-wlm and munge"
}

# The second node's network: a veth pair between this machine and the namespace. Returns 1 (and the
# cluster keeps one node) where the kernel or the container refuses.
make_network() {
    if ip netns exec "$NODE_B" ip -4 addr show "$LINK" 2>/dev/null | grep -qF "$ADDR_B/"; then
        return 0
    fi
    {
        ip netns add "$NODE_B" &&
            ip link add "$LINK" type veth peer name "$LINK-b" &&
            ip link set "$LINK-b" netns "$NODE_B" &&
            ip netns exec "$NODE_B" ip link set "$LINK-b" name "$LINK" &&
            ip addr add "$ADDR_A/24" dev "$LINK" && ip link set "$LINK" up &&
            ip netns exec "$NODE_B" ip addr add "$ADDR_B/24" dev "$LINK" &&
            ip netns exec "$NODE_B" ip link set "$LINK" up &&
            ip netns exec "$NODE_B" ip link set lo up &&
            ip netns exec "$NODE_B" ip route add default via "$ADDR_A"
    } 2>"$LOGS/network.log" || {
        echo "slurm_cluster: no second node (network namespaces: $(tail -n 1 "$LOGS/network.log"))" >&2
        ip netns delete "$NODE_B" 2>/dev/null || true
        ip link delete "$LINK" 2>/dev/null || true
        return 1
    }
}

# Each node resolves both names, as on a real cluster: the second node's own /etc/hosts (bound over
# the machine's in its mount namespace) and one line in this machine's.
write_hosts() {
    local node="$1"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$ADDR_A" "$node" "$ADDR_B" "$NODE_B" >"$STATE/hosts-$NODE_B"
    grep -qF "$NODE_B $MARKER" /etc/hosts || echo "$ADDR_B $NODE_B $MARKER" >>/etc/hosts
}

write_config() {
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not replacing a real cluster's configuration"
    fi
    local node="$1" two="$2" ctld_addr=127.0.0.1 nodes
    nodes="$node"
    if [[ "$two" == 1 ]]; then
        ctld_addr="$ADDR_A"
        nodes="$node,$NODE_B"
    fi
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
    cat >"$CONF" <<EOF
$MARKER: a test cluster
ClusterName=$CLUSTER_NAME
SlurmctldHost=$node($ctld_addr)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
# No cgroups: containers and CI machines often lack a writable cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
# The node is what this file says, not what slurmd finds, so the scripts' --mem and
# --cpus-per-task fit on a small machine.
SlurmdParameters=config_overrides
ReturnToService=2
# Look at pending jobs every 5 s (default 60 s): a requeued job starts soon after its two-minute hold.
SchedulerParameters=sched_interval=5
# Finished jobs stay visible to 'scontrol show job' for 10 minutes (Restarts=, JobState=).
MinJobAge=600
# No slurmdbd, so no sacct; every job end (requeues included) is one line in this file.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName=$node NodeAddr=$ctld_addr CPUs=64 RealMemory=65536 Gres=gpu:16 State=UNKNOWN
EOF
    if [[ "$two" == 1 ]]; then
        echo "NodeName=$NODE_B NodeAddr=$ADDR_B CPUs=64 RealMemory=65536 Gres=gpu:16 State=UNKNOWN" >>"$CONF"
    fi
    echo "PartitionName=a100 Nodes=$nodes Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    # Placeholder GPUs: slurmd wants one distinct device file per GPU (a count alone reports 0 GPUs,
    # the same file twice is refused); empty files stand in for /dev/nvidia*.
    mkdir -p "$STATE/gpu"
    local each i
    {
        echo "$MARKER"
        for each in ${nodes//,/ }; do
            for i in $(seq 0 15); do
                touch "$STATE/gpu/$each-$i"
                echo "NodeName=$each Name=gpu File=$STATE/gpu/$each-$i"
            done
        done
    } >/etc/slurm/gres.conf
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
    mkdir -p /run/munge
    chown munge:munge /run/munge
    runuser -u munge -- munged
    cp /run/munge/munged.pid "$STATE/munged.pid"
}

wait_for_nodes() {
    local want="$1" i up
    for i in $(seq 60); do
        up="$(sinfo --noheader --responding --states=idle,mixed,allocated -N -o %N 2>/dev/null | sort -u)"
        if [[ -n "$up" ]] && (($(wc -l <<<"$up") >= want)); then
            echo "slurm_cluster: nodes $(paste -sd, <<<"$up") are up (partition a100, ${i}s)"
            return 0
        fi
        sleep 1
    done
    tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
    die "the nodes did not come up within 60 s; logs in $LOGS"
}

start() {
    [[ "$(id -u)" == 0 ]] || die "run as root (sudo): it installs packages and starts daemons"
    install_packages
    local node two=0
    node="$(hostname -s)"
    mkdir -p "$STATE" "$LOGS"
    if make_network; then
        two=1
        write_hosts "$node"
    fi
    write_config "$node" "$two"
    start_munge
    if ! scontrol ping >/dev/null 2>&1; then
        # -c: a clean state, so no job of an earlier run comes back, nor its job-completion record
        rm -f "$LOGS/jobcomp.log"
        slurmctld -i -c || die "slurmctld did not start; see $LOGS/slurmctld.log"
    fi
    mkdir -p "$STATE/d/$node"
    if ! pgrep -F "$STATE/slurmd-$node.pid" >/dev/null 2>&1; then
        slurmd || die "slurmd did not start; see $LOGS/slurmd-$node.log"
    fi
    if [[ "$two" == 1 ]] && ! pgrep -F "$STATE/slurmd-$NODE_B.pid" >/dev/null 2>&1; then
        # its own hostname (slurmd finds its node by it) and /etc/hosts; slurmd then daemonizes. nsenter,
        # not 'ip netns exec', which mounts a /sys of its own without the cgroup tree that slurmd reads
        mkdir -p "$STATE/d/$NODE_B"
        nsenter --net="/var/run/netns/$NODE_B" unshare --uts --mount sh -c \
            "hostname $NODE_B && mount --bind $STATE/hosts-$NODE_B /etc/hosts && exec slurmd" ||
            die "slurmd of $NODE_B did not start; see $LOGS/slurmd-$NODE_B.log"
    fi
    wait_for_nodes $((1 + two))
}

stop() {
    local pidfile i
    if scontrol ping >/dev/null 2>&1; then
        scancel --full --quiet --user=root || true
    fi
    local pids=() pid
    # munged only if this script started it: another service may need it
    for pidfile in "$STATE"/slurmd*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
        pid="$(cat "$pidfile" 2>/dev/null)" || continue
        if kill "$pid" 2>/dev/null; then
            pids+=("$pid")
        fi
        rm -f "$pidfile"
    done
    for i in $(seq 30); do
        kill -0 "${pids[@]}" 2>/dev/null || break
        sleep 1
    done
    echo "slurm_cluster: stopped (logs in $LOGS)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop" ;;
esac
