#!/usr/bin/env bash
# Bring up a single-node SLURM cluster with accounting (slurmdbd + MariaDB) on loopback.
#
# Needs root and Debian's packages:
#   apt-get install -y slurmctld slurmd slurm-client munge slurmdbd mariadb-server
#
# Idempotent: when the cluster already answers and its node is usable this exits at once.
# Configuration goes to /etc/slurm (where sbatch/sacct look by default), state and logs to
# $MS_SLURM_STATE (default /var/lib/mergesweep-slurm). One node, "localhost", declares
# $MS_SLURM_CPUS CPUs (overcommitting the real cores via SlurmdParameters=config_overrides),
# $MS_SLURM_MEM_MB MB and $MS_SLURM_GPUS fake GPUs (gres.conf points at plain files
# /dev/fakegpuN) so that --gpus requests are scheduled and CUDA_VISIBLE_DEVICES is set.
#
# Partitions:
#   debug  (default) where jobs run; PreemptMode=REQUEUE, so it can be preempted by ...
#   urgent a higher-PriorityTier partition on the same node, used to preempt real jobs;
#   hold   State=DOWN: jobs queue but never start (submission benchmarks).
set -euo pipefail

STATE=${MS_SLURM_STATE:-/var/lib/mergesweep-slurm}
CPUS=${MS_SLURM_CPUS:-16}
GPUS=${MS_SLURM_GPUS:-4}
MEM_MB=${MS_SLURM_MEM_MB:-64000}
CLUSTER=${MS_SLURM_CLUSTER:-mergesweep}
LOG=$STATE/log

die() { echo "slurm-up: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
for b in slurmctld slurmd slurmdbd munged mariadbd sbatch sacct sacctmgr scontrol; do
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || die "missing $b (apt-get install -y slurmctld slurmd slurm-client munge slurmdbd mariadb-server)"
done
export PATH=/usr/sbin:$PATH

node_ok() {
  # usable = controller answers, node is idle/mixed/allocated (not down/drained/unknown)
  local st
  st=$(sinfo -h -n localhost -o %T 2>/dev/null | head -1) || return 1
  case "$st" in idle*|mixed*|allocated*|completing*) return 0 ;; *) return 1 ;; esac
}

if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && pgrep -x slurmdbd >/dev/null \
   && node_ok && sacct -n -X -S now-1minutes >/dev/null 2>&1; then
  echo "slurm-up: cluster already up"
  exit 0
fi

mkdir -p "$STATE"/{ctld,spool,log} /run/slurm /run/munge /run/mysqld /etc/slurm
chown munge:munge /run/munge
chown mysql:mysql /run/mysqld

# --- fake GPUs ---------------------------------------------------------------------------
# slurmd wants character devices (it reads their major/minor); NVIDIA's major is 195. Where
# mknod is not allowed (unprivileged containers), a symlink to /dev/null is a char device too.
for ((i = 0; i < GPUS; i++)); do
  [ -c /dev/fakegpu$i ] && continue
  rm -f /dev/fakegpu$i
  mknod /dev/fakegpu$i c 195 $i 2>/dev/null || ln -s /dev/null /dev/fakegpu$i
done

# --- configuration -------------------------------------------------------------------------
cat > /etc/slurm/slurm.conf <<CONF
# written by mergesweep .ci/slurm/up.sh
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,bf_continue,sched_interval=10,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MaxArraySize=10001
MaxJobCount=100000
MinJobAge=300
KillWait=5
InactiveLimit=0
OverTimeLimit=0
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
DefMemPerCPU=256
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
PartitionName=hold Nodes=localhost MaxTime=INFINITE State=DOWN
CONF

gpu_files="/dev/fakegpu0"
[ "$GPUS" -gt 1 ] && gpu_files="/dev/fakegpu[0-$((GPUS - 1))]"
cat > /etc/slurm/gres.conf <<CONF
AutoDetect=off
NodeName=localhost Name=gpu File=$gpu_files
CONF

cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=/run/slurm/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
CONF
chmod 600 /etc/slurm/slurmdbd.conf
chown root:root /etc/slurm/slurmdbd.conf

# --- munge -------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- munged --force
fi

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for ((k = 0; k < t * 5; k++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out waiting for $what (logs in $LOG)"
}
wait_for 10 munge munge -n

# --- MariaDB -------------------------------------------------------------------------------
if ! mariadb-admin ping >/dev/null 2>&1; then
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOG/mariadb-install.log" 2>&1
  setsid nohup mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M \
    >"$LOG/mariadb.log" 2>&1 < /dev/null &
  wait_for 30 mariadb mariadb-admin ping
fi
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

# --- slurmdbd, slurmctld, slurmd ------------------------------------------------------------
if ! pgrep -x slurmdbd >/dev/null; then
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
fi
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -n list account format=account | grep -qw ci || sacctmgr -i add account ci Description=ci Organization=mergesweep >/dev/null
sacctmgr -n list user format=user | grep -qw root || true
sacctmgr -n list assoc format=user,account | grep -qE "root +ci" || sacctmgr -i add user root account=ci >/dev/null || true

if pgrep -x slurmctld >/dev/null; then
  scontrol reconfigure >/dev/null 2>&1 || true
else
  slurmctld
fi
wait_for 30 slurmctld scontrol ping
pgrep -x slurmd >/dev/null || slurmd -N localhost
wait_for 30 "node localhost" node_ok || true
if ! node_ok; then
  # a node left drained/down by a previous run: bring it back
  scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
  wait_for 30 "node localhost to be usable" node_ok
fi
wait_for 30 "accounting" sacct -n -X -S now-1minutes
echo "slurm-up: cluster up ($(sinfo -h -o '%P %D %T %C %G' | tr '\n' ';'))"
