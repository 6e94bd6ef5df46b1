#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian's packages, for tests/test_slurm_cluster.py.
#   sudo bash .ci/slurm_cluster.sh start     # install slurm-wlm and munge if needed, start the daemons
#   sudo bash .ci/slurm_cluster.sh stop      # cancel its jobs, stop the daemons
# CPU only: the node claims 64 CPUs, 64 GB and 16 placeholder GPUs, so the job scripts' #SBATCH
# lines schedule unchanged, six two-GPU jobs at once. It refuses to touch a slurm.conf it did not write.
set -euo pipefail

CLUSTER_NAME=unet-test  # tests/test_slurm_cluster.py runs only against a controller of this name
CONF=/etc/slurm/slurm.conf
MARKER="# written by .ci/slurm_cluster.sh"
STATE=/var/lib/slurm-unet-test
LOGS=/var/log/slurm-unet-test

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

write_config() {
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not replacing a real cluster's configuration"
    fi
    local node
    node="$(hostname -s)"
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
    cat >"$CONF" <<EOF
$MARKER: a one-node test cluster
ClusterName=$CLUSTER_NAME
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
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
NodeName=$node NodeAddr=127.0.0.1 CPUs=64 RealMemory=65536 Gres=gpu:16 State=UNKNOWN
PartitionName=a100 Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    # Placeholder GPUs: slurmd wants one distinct device file per GPU (a count alone reports 0 GPUs,
    # the same file twice is refused); empty files stand in for /dev/nvidia*.
    mkdir -p "$STATE/gpu"
    {
        echo "$MARKER"
        for i in $(seq 0 15); do
            touch "$STATE/gpu/$i"
            echo "NodeName=$node Name=gpu File=$STATE/gpu/$i"
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

wait_for_node() {
    local i
    for i in $(seq 60); do
        if sinfo --noheader --responding --states=idle,mixed,allocated -o %N 2>/dev/null | grep -q .; then
            echo "slurm_cluster: node $(hostname -s) is up (partition a100, ${i}s)"
            return 0
        fi
        sleep 1
    done
    tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
    die "the node did not come up within 60 s; logs in $LOGS"
}

start() {
    [[ "$(id -u)" == 0 ]] || die "run as root (sudo): it installs packages and starts daemons"
    install_packages
    write_config
    start_munge
    if ! scontrol ping >/dev/null 2>&1; then
        # -c: a clean state, so no job of an earlier run comes back, nor its job-completion record
        rm -f "$LOGS/jobcomp.log"
        slurmctld -i -c || die "slurmctld did not start; see $LOGS/slurmctld.log"
    fi
    if ! pgrep -F "$STATE/slurmd.pid" >/dev/null 2>&1; then
        slurmd || die "slurmd did not start; see $LOGS/slurmd.log"
    fi
    wait_for_node
}

stop() {
    local pidfile i
    if scontrol ping >/dev/null 2>&1; then
        scancel --full --quiet --user=root || true
    fi
    local pids=() pid
    # munged only if this script started it: another service may need it
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
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
