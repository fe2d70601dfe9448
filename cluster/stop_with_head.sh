#!/usr/bin/env bash
# Stop this worker node's Ray once the head is gone.
#
#   stop_with_head.sh HEAD_IP PORT      (started in the background by local.yaml's worker start)
#
# `ray down` runs `ray stop` on the head only, and the local provider terminates no machine: on a
# worker the raylet exits a minute after it loses the head, but its log monitor stays (and its
# dashboard and runtime-env agents have been seen to stay too). This checks the head's GCS port every 5 s; after 3 failures in a row
# (15 s) it runs `ray stop` here. It exits without stopping anything once this node's raylet is
# gone for another reason (`ray stop` by hand, or the `ray stop` that precedes a restart), so it
# never races a new `ray start`.
set -u
head=$1 port=$2
misses=0
sleep 5
while pgrep -x raylet > /dev/null; do
    if timeout 5 bash -c "exec 3<> /dev/tcp/$head/$port" 2> /dev/null; then
        misses=0
    else
        misses=$((misses + 1))
    fi
    if [ "$misses" -ge 3 ]; then
        echo "$(date -u +%FT%TZ): head $head:$port unreachable for 15 s: ray stop"
        ray stop
        exit
    fi
    sleep 5
done
echo "$(date -u +%FT%TZ): no raylet on this node: nothing to stop"
