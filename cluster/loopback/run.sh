#!/usr/bin/env bash
# `ray up cluster/local.yaml` for real, on this one machine: two "hosts" made of Linux namespaces.
#
#   sudo cluster/loopback/run.sh [PROJECT_PYTHON]      (from anywhere; exit 0 pass, 77 skip)
#
# head and worker are each a network, PID, mount and UTS namespace with its own address on a veth
# pair (10.213.213.1 and .2, no route out: nothing leaves the pair), its own /tmp, /dev/shm and
# home, the shared folder bind-mounted as its "NFS" mount, and Debian's sshd on port 22 with a
# throwaway key. The cluster file is cluster/local.yaml with only the addresses, the user, the key
# and the paths changed (min/max_workers follow the single worker address). From the head, as an
# on-premises user would from their machine: `ray up -y`, wait for 2 nodes in `ray status`, `ray
# job submit` of the quick search's smoke run with its results on the shared folder, check that
# every trial ran on the worker (node ids in results.csv), `ray down -y`, check that no Ray
# process is left on either host. Everything it made (processes, namespaces, veth, mounts, sshd,
# keys, /run/sshd) is removed on exit, also when a step fails.
#
# The hosts share this machine's filesystem, so they share one Python: cluster/loopback/.venv, a
# virtualenv layered on PROJECT_PYTHON's environment (default: python3 on PATH; it must have the
# project's requirements) with what `ray[default,tune]` and the dashboard extra add, installed
# once from the package index. Each host's ~/mtl-venv links to it and its ~/mtl-search comes from
# `ray up`'s copy, so the cluster file's setup finds everything installed and never runs pip (the
# hosts have no network): that is the offline path of cluster/README.md. The data is a local copy
# ($MTL_DATA_DIR) put on the shared folder before `ray up`, which setup must accept as it is.
#
# Prints "SKIP: reason" and exits 77 where it cannot run: not root, no namespaces, no sshd and no
# apt-get to install it, no $MTL_DATA_DIR. Timings go to stdout as "TIME name seconds".
set -euo pipefail
{ # the whole script is read before it runs

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PROJECT_PY=${1:-python3}
HOSTS_VENV=$REPO/cluster/loopback/.venv
HEAD_IP=10.213.213.1 WORKER_IP=10.213.213.2
RAY_VERSION=2.60.0
TAG=mtl$$
PATH_IN=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

skip() { echo "SKIP: $*"; exit 77; }
log() { echo "[$(date -u +%T)] $*"; }
now() { date +%s.%N; }
elapsed() { "$PROJECT_PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

# --------------------------------------------------------------------------- can it run here?
[ "$(id -u)" = 0 ] || skip "needs root (network, PID and mount namespaces, sshd on port 22)"
for tool in unshare nsenter ip pgrep ps timeout; do
    command -v "$tool" > /dev/null || skip "$tool not found"
done
unshare --net --pid --mount --uts --fork true 2> /dev/null ||
    skip "cannot create network, PID, mount and UTS namespaces here"
[ -n "${MTL_DATA_DIR:-}" ] && [ -d "$MTL_DATA_DIR" ] ||
    skip "MTL_DATA_DIR is not set to a folder with the data (the hosts have no internet)"
"$PROJECT_PY" -c "import ray, sys; sys.exit(ray.__version__ != '$RAY_VERSION')" 2> /dev/null ||
    skip "$PROJECT_PY has no ray==$RAY_VERSION (pass the project's python)"

WORK=
CREATED_POLICY=
CREATED_RUN_SSHD=
declare -A INIT_PID=()
UNSHARE_PIDS=()

exec 3>&1 4>&2 # the script's own output, for cleanup: a signal may come during a redirected step
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    exec 1>&3 2>&4
    if [ "$rc" != 0 ] && [ "$rc" != 77 ] && [ -n "$WORK" ] && [ -d "$WORK" ]; then
        # session_latest links to /tmp/ray/..., a path inside the head: its real folder instead.
        local session
        session=$(ls -d "$WORK"/head/tmp/ray/session_2*/ 2> /dev/null | tail -n 1)
        for f in "$session"logs/monitor.{out,err} "$session"logs/job-driver-*.log \
            "$WORK"/worker/home/stop_with_head.log "$WORK"/*/sshd.log "$WORK"/*.log; do
            [ -s "$f" ] || continue
            echo "----- tail of $f"
            grep -v "syslogin_perform_logout" "$f" | tail -n 40 | cut -c1-400
        done
    fi
    # Killing a PID namespace's init kills every process in it; its network namespace (with the
    # veth end and so the pair) and its mount namespace (every mount made in it) go with them.
    local pid
    for pid in "${INIT_PID[@]}" "${UNSHARE_PIDS[@]}"; do
        kill -KILL "$pid" 2> /dev/null
    done
    for pid in "${UNSHARE_PIDS[@]}"; do
        wait "$pid" 2> /dev/null
    done
    for pid in "${INIT_PID[@]}"; do
        while kill -0 "$pid" 2> /dev/null; do sleep 0.2; done
    done
    ip link del "${TAG}h" 2> /dev/null
    [ -n "$CREATED_RUN_SSHD" ] && rmdir /run/sshd 2> /dev/null
    [ -n "$CREATED_POLICY" ] && rm -f /usr/sbin/policy-rc.d
    [ -n "$WORK" ] && rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------------------- sshd and rsync
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync > /dev/null || missing+=(rsync) # `ray up` copies the checkout with it
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get > /dev/null || skip "${missing[*]} not installed and no apt-get"
    log "installing ${missing[*]} (its service is not started: policy-rc.d)"
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        CREATED_POLICY=1
    fi
    { apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }; } \
        > /dev/null || skip "apt-get could not install ${missing[*]}"
    [ -n "$CREATED_POLICY" ] && rm -f /usr/sbin/policy-rc.d && CREATED_POLICY=
fi
for tool in ssh ssh-keygen rsync; do # openssh-server brings the client
    command -v "$tool" > /dev/null || skip "$tool not found"
done

# --------------------------------------------------------------------------- the hosts' Python
PROJECT_SITE=$("$PROJECT_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
hosts_venv_ok() { # built, on this project environment, with everything installed
    [ -x "$HOSTS_VENV/bin/ray" ] &&
        grep -qxF "$PROJECT_SITE" "$HOSTS_VENV"/lib/python3*/site-packages/mtl-loopback.pth &&
        "$HOSTS_VENV/bin/python" "$REPO/cluster/installed.py" \
            "ray[default,tune]==$RAY_VERSION" "optuna-dashboard>=0.15" > /dev/null 2>&1
}
if ! hosts_venv_ok; then
    log "building $HOSTS_VENV (once)"
    rm -rf "$HOSTS_VENV"
    "$PROJECT_PY" -m venv "$HOSTS_VENV"
    echo '*' > "$HOSTS_VENV/.gitignore"
    site=$("$HOSTS_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # The project environment's packages (Ray, torch, ...), then each host's own ~/mtl-search:
    # the project imports from the checkout `ray up` copied to that host, as with `pip install -e`.
    {
        echo "$PROJECT_SITE"
        echo 'import os, sys; sys.path.append(os.path.expanduser("~/mtl-search"))'
    } > "$site/mtl-loopback.pth"
    "$HOSTS_VENV/bin/pip" install -q "ray[default,tune]==$RAY_VERSION" "optuna-dashboard>=0.15" \
        2>&1 | grep -v "^WARNING: Location" || true
    printf '#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' \
        "$HOSTS_VENV/bin/python" > "$HOSTS_VENV/bin/ray"
    chmod +x "$HOSTS_VENV/bin/ray"
    hosts_venv_ok || {
        echo "FAIL: $HOSTS_VENV lacks ray[default,tune]==$RAY_VERSION or optuna-dashboard" >&2
        exit 1
    }
fi

# --------------------------------------------------------------------------- the hosts
WORK=$(mktemp -d /var/tmp/mtl-loopback.XXXXXX) # not /tmp: each host mounts its own /tmp
chmod 755 "$WORK"
NFS=$WORK/nfs # the shared folder's path on every host (a mount there, as with NFS)
mkdir -p "$WORK/shared/mtl/data" "$NFS"
cp "$MTL_DATA_DIR"/*.csv "$WORK/shared/mtl/data/"
ssh-keygen -q -t ed25519 -N "" -C mtl-loopback -f "$WORK/key"
ssh-keygen -q -t ed25519 -N "" -C mtl-loopback-host -f "$WORK/hostkey"
cp "$WORK/key.pub" "$WORK/authorized_keys"
if [ ! -d /run/sshd ]; then
    mkdir -p /run/sshd && CREATED_RUN_SSHD=1 # sshd's privilege separation directory
fi

start_host() { # name address
    local host=$1 addr=$2 dir=$WORK/$1
    mkdir -p "$dir/tmp" "$dir/home"
    chmod 1777 "$dir/tmp"
    # Each host has its own /tmp (Ray's session folders); what the hosts need from this machine's
    # /tmp (a checkout or environment there) is mounted into it at the same path.
    local keep=() path binds=""
    for path in "$REPO" "$(readlink -f "$PROJECT_SITE")"; do
        case $path in /tmp/*) keep+=("$path") ;; esac
    done
    for path in "${keep[@]}"; do
        mkdir -p "$dir$path"
        binds+="mount --bind $path $dir$path; "
    done
    ln -s "$HOSTS_VENV" "$dir/home/mtl-venv"
    # root's home is this host's own folder: the same ~ paths, a different folder on each host.
    awk -F: -v OFS=: -v home="$dir/home" '$1 == "root" { $6 = home } 1' /etc/passwd > "$dir/passwd"
    cat > "$dir/sshd_config" << EOF
ListenAddress $addr
HostKey $WORK/hostkey
PidFile $dir/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AuthorizedKeysFile $WORK/authorized_keys
Subsystem sftp internal-sftp
EOF
    # --kill-child: should this script be killed outright, its namespaces still go with it.
    unshare --net --pid --mount --uts --fork --kill-child --mount-proc --propagation private \
        bash -c "hostname $host
            $binds mount --rbind $dir/tmp /tmp
            mount -t tmpfs -o size=4g tmpfs /dev/shm
            mount --bind $dir/passwd /etc/passwd
            mount --bind $WORK/shared $NFS
            while :; do sleep 5; done" 2> "$dir/init.log" &
    local unshare_pid=$! child=
    UNSHARE_PIDS+=("$unshare_pid")
    for _ in $(seq 100); do
        child=$(pgrep -P "$unshare_pid" || true)
        [ -n "$child" ] && [ "$(readlink "/proc/$child/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] &&
            grep -q "$NFS" "/proc/$child/mountinfo" && break
        sleep 0.1
    done
    grep -q "$NFS" "/proc/$child/mountinfo" 2> /dev/null || {
        cat "$dir/init.log" >&2
        echo "FAIL: the namespaces of $host did not start" >&2
        exit 1
    }
    INIT_PID[$host]=$child
}

in_host() { # host command...: run in the host's namespaces, environment as an SSH login has it
    local host=$1
    shift
    nsenter -t "${INIT_PID[$host]}" --net --pid --mount --uts -- \
        env -i HOME="$WORK/$host/home" USER=root LOGNAME=root SHELL=/bin/bash LANG=C.UTF-8 \
        PATH="$HOSTS_VENV/bin:$PATH_IN" "$@"
}

start_host head "$HEAD_IP"
start_host worker "$WORKER_IP"
ip link add "${TAG}h" type veth peer name "${TAG}w"
ip link set "${TAG}h" netns "${INIT_PID[head]}"
ip link set "${TAG}w" netns "${INIT_PID[worker]}"
for pair in "head ${TAG}h $HEAD_IP" "worker ${TAG}w $WORKER_IP"; do
    read -r host dev addr <<< "$pair"
    in_host "$host" ip link set lo up
    in_host "$host" ip addr add "$addr/24" dev "$dev"
    in_host "$host" ip link set "$dev" up
    # A default route over the pair gives Ray a non-loopback address to find; the peer does not
    # forward (a new namespace's ip_forward is 0), so nothing leaves the pair.
    in_host "$host" ip route add default dev "$dev"
    in_host "$host" /usr/sbin/sshd -f "$WORK/$host/sshd_config" -E "$WORK/$host/sshd.log"
done
log "hosts up: head $HEAD_IP, worker $WORKER_IP (sshd on port 22 in each)"

# --------------------------------------------------------------------------- the cluster file
CONFIG=$WORK/loopback.yaml
"$PROJECT_PY" - "$REPO/cluster/local.yaml" "$CONFIG" "$HEAD_IP" "$WORKER_IP" "$WORK/key" "$NFS" << 'EOF'
import sys

import yaml

source, dest, head_ip, worker_ip, key, nfs = sys.argv[1:]
config = yaml.safe_load(open(source))
# Addresses (and the worker count that follows them), user, key, paths: nothing else.
config["provider"].update(head_ip=head_ip, worker_ips=[worker_ip])
config["min_workers"] = config["max_workers"] = 1
config["auth"] = {"ssh_user": "root", "ssh_private_key": key}
text = yaml.safe_dump(config, sort_keys=False, width=1000).replace("/mnt/mtl-nfs", nfs)
open(dest, "w").write(text)
EOF

# --------------------------------------------------------------------------- ray up
cd "$REPO"
log "ray up"
t0=$(now)
in_host head timeout 900 bash -c "cd '$REPO' && ray up -y '$CONFIG' --no-config-cache" \
    > "$WORK/ray_up.log" 2>&1 ||
    { echo "FAIL: ray up" >&2; exit 1; }
t_head=$(now)
log "ray up returned: head ready"
grep -E "^installed\.py: |a usable copy of the data|open files limited" "$WORK/ray_up.log" |
    grep -v "updater.py\|command_runner.py" | sed 's/^/  /' || true
nodes=0
for _ in $(seq 120); do
    nodes=$(in_host head ray status 2> /dev/null |
        awk '/^Active:/ { on = 1; next } /^[A-Z]/ { on = 0 } on && $1 ~ /^[0-9]+$/ { n += $1 }
            END { print n + 0 }')
    [ "$nodes" -ge 2 ] && break
    sleep 5
done
t_ready=$(now)
[ "$nodes" -ge 2 ] || {
    in_host head ray status || true
    echo "FAIL: the worker did not join in 600 s" >&2
    exit 1
}
in_host head bash -c 'cat /tmp/ray/session_latest/logs/monitor.{out,err} 2> /dev/null' |
    grep -E "^installed\.py: |open files limited" | grep -v "command_runner.py" | sort -u |
    sed 's/^/  worker setup: /' || true
echo "TIME ray_up_to_head_ready $(elapsed "$t0" "$t_head")"
echo "TIME ray_up_to_2_nodes $(elapsed "$t0" "$t_ready")"

# --------------------------------------------------------------------------- the search, as a job
# The job's runtime env names a data folder other than the cluster's default one: every process
# of the job must see it (a value in ~/.bashrc used to override it).
cp -r "$WORK/shared/mtl/data" "$WORK/shared/job-data"
runtime_env=$(printf '{"env_vars": {"MTL_DATA_DIR": "%s", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}' \
    "$NFS/job-data")
log "ray job submit"
t_submit=$(now)
in_host head timeout 900 ray job submit --address http://127.0.0.1:8265 \
    --runtime-env-json "$runtime_env" -- \
    bash -c "cd ~/mtl-search && python cluster/loopback/env_probe.py MTL_DATA_DIR=$NFS/job-data &&
        python -m mtl.search search_spaces/quick.yaml --smoke --address auto \
            --set experiment.storage_path=$NFS/ray_results" > "$WORK/job.log" 2>&1 &&
    grep -q "succeeded" "$WORK/job.log" ||
    { echo "FAIL: the job failed" >&2; exit 1; }
t_done=$(now)
grep -E "^env_probe" "$WORK/job.log" | sed 's/^/  /'
echo "TIME job_submit_to_finished $(elapsed "$t_submit" "$t_done")"

# --------------------------------------------------------------------------- where trials ran
in_host head python - "$WORK/shared/ray_results" "$WORKER_IP" "$t_submit" << 'EOF'
import json
import sys
from pathlib import Path

import pandas as pd
import ray

results, worker_ip, t_submit = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
ray.init(address="auto", logging_level="ERROR")
node_of_ip = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
ray.shutdown()
(csv,) = results.glob("*/results.csv")
trials = pd.read_csv(csv)
print(f"  {csv}: {len(trials)} trials, node ids {sorted(set(trials['node_id']))}")
worker = node_of_ip[worker_ip]
if len(trials) == 0 or (trials["node_id"] != worker).any():
    sys.exit(f"FAIL: not every trial ran on the worker {worker_ip} ({worker})")
first = min(
    json.loads(f.read_text().splitlines()[0])["timestamp"]
    for f in csv.parent.glob("*/result.json")
    if f.read_text().strip()
)
print(f"TIME job_submit_to_first_report {first - t_submit:.0f}")
EOF

# --------------------------------------------------------------------------- ray down
log "ray down"
t_down=$(now)
in_host head timeout 300 bash -c "cd '$REPO' && ray down -y '$CONFIG'" > "$WORK/ray_down.log" 2>&1 ||
    { echo "FAIL: ray down" >&2; exit 1; }
echo "TIME ray_down $(elapsed "$t_down" "$(now)")"
left() { # host: its processes other than its init (PID 1, reaping; its sleep), sshd and ps
    in_host "$1" ps -eo pid=,ppid=,args= |
        awk '$1 != 1 && !($2 == 1 && $3 " " $4 == "sleep 5") && $3 !~ /sshd/ && $3 != "ps"'
}
for host in head worker; do
    for _ in $(seq 24); do
        [ -z "$(left "$host")" ] && break
        sleep 5
    done
    if [ -n "$(left "$host")" ]; then
        left "$host"
        echo "FAIL: processes left on $host 120 s after ray down" >&2
        exit 1
    fi
done
echo "TIME ray_down_to_worker_clean $(elapsed "$t_down" "$(now)")"
log "PASS"
exit 0
}
