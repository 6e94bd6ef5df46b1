#!/usr/bin/env bash
# A SLURM cluster on this machine shaped like UQ's Rangpur, from Debian's packages, for
# tests/test_slurm_cluster.py.
#   sudo bash .ci/slurm_cluster.sh start     # install slurm-wlm and munge if needed, start the daemons
#   sudo bash .ci/slurm_cluster.sh stop      # cancel its jobs, stop the daemons
# As students reported Rangpur in September and October 2026:
#   - GPU nodes a100-0 .. a100-9, each with 8 CPUs and one GPU, declaring RealMemory=1 (CfgTRES mem=1M):
#     a job that asks for memory (--mem, --mem-per-cpu) is refused at submission;
#   - partitions a100-test (the default, 20-minute limit), a100 (any account), comp3710
#     (AllowAccounts=comp3710: a job without --account=comp3710 never starts) and cpu (no GPU);
#   - the course's read-only ISIC copy at /home/groups/comp3710/ISIC2018.
# Each GPU node is a slurmd in its own network, UTS and mount namespaces, with its own address on a
# bridge (10.77.0.1 is this machine, a100-N is 10.77.0.(10+N)), its own hostname and its own
# /etc/hosts. This machine is the cpu
# partition's node. The GPUs are placeholder device files: the scheduler hands them out and sets
# CUDA_VISIBLE_DEVICES, but no process finds a CUDA device. No slurmdbd: the one-job-per-user limit
# of a100-test (a QOS) is not reproduced. It refuses to touch a slurm.conf it did not write.
set -euo pipefail

CLUSTER_NAME=unet-test  # tests/test_slurm_cluster.py runs only against a controller of this name
CONF=/etc/slurm/slurm.conf
MARKER="# written by .ci/slurm_cluster.sh"
STATE=/var/lib/slurm-unet-test
LOGS=/var/log/slurm-unet-test
GPU_NODES=10          # a100-0 .. a100-9, as on Rangpur
BRIDGE=unet0          # the fabric's name on every node: GLOO_SOCKET_IFNAME=unet0 serves them all
HOST_ADDR=10.77.0.1
# The course's data copy: the tests write into COURSE_SOURCE; jobs see it read-only at COURSE_DATA.
# Mounted before the nodes' namespaces are made, so that every node has it.
COURSE_DATA=/home/groups/comp3710/ISIC2018
COURSE_SOURCE="$STATE/course-data"

die() {
    echo "slurm_cluster: $*" >&2
    exit 1
}

gpu_node() { echo "a100-$1"; }
gpu_addr() { echo "10.77.0.$((10 + $1))"; }

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

# A bridge on this machine and one network namespace per GPU node, joined to it by a veth pair.
make_network() {
    if ! ip -4 addr show "$BRIDGE" 2>/dev/null | grep -qF "$HOST_ADDR/"; then
        {
            ip link add "$BRIDGE" type bridge &&
                ip addr add "$HOST_ADDR/24" dev "$BRIDGE" &&
                ip link set "$BRIDGE" up
        } 2>>"$LOGS/network.log" || die "could not make the bridge $BRIDGE: $(tail -n 1 "$LOGS/network.log")"
    fi
    # bridged frames must not meet a firewall's FORWARD policy (Docker's is DROP)
    echo 0 >/proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || true
    local i node addr
    for ((i = 0; i < GPU_NODES; i++)); do
        node="$(gpu_node "$i")"
        addr="$(gpu_addr "$i")"
        if ip netns exec "$node" ip -4 addr show "$BRIDGE" 2>/dev/null | grep -qF "$addr/"; then
            continue
        fi
        {
            ip netns add "$node" &&
                ip link add "unet-$i" type veth peer name "unet-$i-b" &&
                ip link set "unet-$i" master "$BRIDGE" && ip link set "unet-$i" up &&
                ip link set "unet-$i-b" netns "$node" &&
                ip netns exec "$node" ip link set "unet-$i-b" name "$BRIDGE" &&
                ip netns exec "$node" ip addr add "$addr/24" dev "$BRIDGE" &&
                ip netns exec "$node" ip link set "$BRIDGE" up &&
                ip netns exec "$node" ip link set lo up &&
                ip netns exec "$node" ip route add default via "$HOST_ADDR"
        } 2>>"$LOGS/network.log" || die "could not make the network namespace of $node: $(tail -n 1 "$LOGS/network.log")"
    done
}

# Every node resolves every name to its address on the bridge: one line per GPU node in this machine's
# /etc/hosts, and on each GPU node its own /etc/hosts (bound over the machine's in its mount namespace,
# where this machine's name may stand for 127.0.0.1).
write_hosts() {
    local host="$1" i lines=""
    for ((i = 0; i < GPU_NODES; i++)); do
        lines+="$(gpu_addr "$i") $(gpu_node "$i")"$'\n'
        grep -qF "$(gpu_node "$i") $MARKER" /etc/hosts || echo "$(gpu_addr "$i") $(gpu_node "$i") $MARKER" >>/etc/hosts
    done
    for ((i = 0; i < GPU_NODES; i++)); do
        printf '127.0.0.1 localhost\n%s %s\n%s' "$HOST_ADDR" "$host" "$lines" \
            >"$STATE/hosts-$(gpu_node "$i")"
    done
}

write_config() {
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not replacing a real cluster's configuration"
    fi
    local host="$1" gpus
    gpus="a100-[0-$((GPU_NODES - 1))]"
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
    cat >"$CONF" <<EOF
$MARKER: a test cluster shaped like Rangpur
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host($HOST_ADDR)
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
# The nodes are what this file says, not what slurmd finds on this small machine.
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
# Rangpur's nodes declare RealMemory=1: a memory request cannot be satisfied.
NodeName=$host NodeAddr=$HOST_ADDR CPUs=64 RealMemory=1 State=UNKNOWN
EOF
    local i
    for ((i = 0; i < GPU_NODES; i++)); do
        echo "NodeName=$(gpu_node "$i") NodeAddr=$(gpu_addr "$i") CPUs=8 RealMemory=1 Gres=gpu:1 State=UNKNOWN" >>"$CONF"
    done
    cat >>"$CONF" <<EOF
PartitionName=a100-test Nodes=$gpus Default=YES MaxTime=20 State=UP
PartitionName=a100 Nodes=$gpus MaxTime=INFINITE State=UP
PartitionName=comp3710 Nodes=$gpus AllowAccounts=comp3710 MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=$host MaxTime=INFINITE State=UP
EOF
    # Placeholder GPUs: slurmd wants a device file per GPU; an empty file stands in for /dev/nvidia0.
    mkdir -p "$STATE/gpu"
    {
        echo "$MARKER"
        for ((i = 0; i < GPU_NODES; i++)); do
            touch "$STATE/gpu/$(gpu_node "$i")"
            echo "NodeName=$(gpu_node "$i") Name=gpu File=$STATE/gpu/$(gpu_node "$i")"
        done
    } >/etc/slurm/gres.conf
}

# The course's copy, read-only for every process, root included (a read-only bind mount).
mount_course_data() {
    mkdir -p "$COURSE_SOURCE" "$COURSE_DATA"
    if findmnt -n "$COURSE_DATA" >/dev/null 2>&1; then
        # a bind mount shows its source's inode; another one means the source was replaced since
        [[ "$(stat -c %d:%i "$COURSE_DATA")" == "$(stat -c %d:%i "$COURSE_SOURCE")" ]] && return 0
        umount "$COURSE_DATA" || die "$COURSE_DATA is mounted from elsewhere and could not be unmounted"
    fi
    if ! { mount --bind "$COURSE_SOURCE" "$COURSE_DATA" && mount -o remount,ro,bind "$COURSE_DATA"; }; then
        die "could not mount $COURSE_SOURCE read-only at $COURSE_DATA"
    fi
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
    for i in $(seq 90); do
        up="$(sinfo --noheader --responding --states=idle,mixed,allocated -N -o %N 2>/dev/null | sort -u)"
        if [[ -n "$up" ]] && (($(wc -l <<<"$up") >= want)); then
            echo "slurm_cluster: $(wc -l <<<"$up") nodes up in ${i}s; partitions:"
            sinfo -o '  %P %l %D %N'
            return 0
        fi
        sleep 1
    done
    tail -n 20 "$LOGS/slurmctld.log" "$LOGS"/slurmd-*.log >&2 || true
    die "the nodes did not come up within 90 s; logs in $LOGS"
}

start() {
    [[ "$(id -u)" == 0 ]] || die "run as root (sudo): it installs packages and starts daemons"
    install_packages
    local host i node
    host="$(hostname -s)"
    mkdir -p "$STATE" "$LOGS"
    make_network
    write_hosts "$host"
    write_config "$host"
    mount_course_data
    start_munge
    if ! scontrol ping >/dev/null 2>&1; then
        # -c: a clean state, so no job of an earlier run comes back, nor its job-completion record
        rm -f "$LOGS/jobcomp.log"
        slurmctld -i -c || die "slurmctld did not start; see $LOGS/slurmctld.log"
    fi
    mkdir -p "$STATE/d/$host"
    if ! pgrep -F "$STATE/slurmd-$host.pid" >/dev/null 2>&1; then
        slurmd || die "slurmd did not start; see $LOGS/slurmd-$host.log"
    fi
    for ((i = 0; i < GPU_NODES; i++)); do
        node="$(gpu_node "$i")"
        pgrep -F "$STATE/slurmd-$node.pid" >/dev/null 2>&1 && continue
        mkdir -p "$STATE/d/$node"
        # its own hostname (slurmd finds its node by it) and /etc/hosts; slurmd then daemonizes. nsenter,
        # not 'ip netns exec', which mounts a /sys of its own without the cgroup tree that slurmd reads
        nsenter --net="/var/run/netns/$node" unshare --uts --mount sh -c \
            "hostname $node && mount --bind $STATE/hosts-$node /etc/hosts && exec slurmd" ||
            die "slurmd of $node did not start; see $LOGS/slurmd-$node.log"
    done
    wait_for_nodes $((1 + GPU_NODES))
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
    # the GPU nodes' copies of the mount went with their namespaces' last process
    if findmnt -n "$COURSE_DATA" >/dev/null 2>&1; then
        umount "$COURSE_DATA" || true
    fi
    echo "slurm_cluster: stopped (logs in $LOGS)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop" ;;
esac
