#!/usr/bin/env bash
# corecast host check: inspects this machine for what corecast needs (io_uring, memlock, open
# files, listen backlog, TCP memory, CPUs, IRQs, hugepages, CPU frequency) and prints, for every
# finding, what to change and the exact command. Read-only: it changes nothing.
#
# Exit code: 0 when nothing needs changing, 1 when at least one CHANGE was printed, 2 on bad
# arguments. Limits (memlock, nofile) are read from this shell; a systemd service or a container
# has its own (see tuning/README.md), so run it the way the server runs, or check those settings.
#
# Usage: tuning/check.sh [--shards N] [--cpus LIST] [--connections N] [--max-queue-bytes N]
#                        [--database] [--loadgen]
#   --shards N           shards you will run (default: CPUs, one fewer with --database)
#   --cpus LIST          CPUs the shards are pinned to, as for corecast --cpus (default 0..N-1)
#   --connections N      connections you expect per server (default 10000)
#   --max-queue-bytes N  corecast --max-queue-bytes (default 4194304)
#   --database           DATABASE_URL will be set (the Postgres ingest thread takes a core)
#   --loadgen            this host runs the load generator (checks the ephemeral port range)

set -u
export LC_ALL=C

shards=""
cpus_arg=""
connections=10000
max_queue=$((4 << 20))
database=0
loadgen=0

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --shards) shards="${2:-}"; shift 2 ;;
        --cpus) cpus_arg="${2:-}"; shift 2 ;;
        --connections) connections="${2:-}"; shift 2 ;;
        --max-queue-bytes) max_queue="${2:-}"; shift 2 ;;
        --database) database=1; shift ;;
        --loadgen) loadgen=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "check.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$connections" "$max_queue" ${shards:+"$shards"}; do
    case "$v" in
        '' | *[!0-9]*) echo "check.sh: not a number: '$v'" >&2; exit 2 ;;
    esac
done

changes=0
section() { printf '\n== %s\n' "$*"; }
ok() { printf '  ok      %s\n' "$*"; }
# change MESSAGE [COMMAND...]: a finding that needs action; each COMMAND on its own line.
change() {
    printf '  CHANGE  %s\n' "$1"
    shift
    local c
    for c in "$@"; do printf '            %s\n' "$c"; done
    changes=$((changes + 1))
}
# note MESSAGE [COMMAND...]: information or an optional improvement; does not fail the check.
note() {
    printf '  note    %s\n' "$1"
    shift
    local c
    for c in "$@"; do printf '            %s\n' "$c"; done
}
readf() { cat "$1" 2>/dev/null || printf '%s' "${2:-}"; }
kib() { # human-readable size of $1 KiB, one decimal
    awk -v k="$1" 'BEGIN {
        if (k >= 1048576) printf "%.1f GiB", k / 1048576;
        else if (k >= 1024) printf "%.1f MiB", k / 1024;
        else printf "%d KiB", k }'
}
# Expands a CPU list like 0-3,6 into "0 1 2 3 6".
expand_cpus() {
    local part a b out=""
    local IFS=,
    for part in $1; do
        case "$part" in
            *-*) a=${part%-*}; b=${part#*-}; while [ "$a" -le "$b" ]; do out="$out $a"; a=$((a + 1)); done ;;
            '') ;;
            *) out="$out $part" ;;
        esac
    done
    echo "$out"
}
in_list() { case " $2 " in *" $1 "*) return 0 ;; esac; return 1; }

online=$(expand_cpus "$(readf /sys/devices/system/cpu/online 0)")
ncpu=$(echo "$online" | wc -w)
if [ -z "$shards" ]; then
    shards=$ncpu
    if [ "$database" = 1 ] && [ "$ncpu" -gt 1 ]; then shards=$((ncpu - 1)); fi
fi
[ "$shards" -ge 1 ] || shards=1
if [ -n "$cpus_arg" ]; then
    shard_cpus=$(expand_cpus "$cpus_arg")
else
    shard_cpus=$(seq -s ' ' 0 $((shards - 1)))
fi
housekeeping=""
for c in $online; do in_list "$c" "$shard_cpus" || housekeeping="$housekeeping $c"; done
housekeeping=${housekeeping# }

printf 'corecast host check: %s, kernel %s, %s CPUs online; planning %s shard(s) on CPUs %s, %s connections\n' \
    "$(hostname)" "$(uname -r)" "$ncpu" "$shards" "$(echo "$shard_cpus" | xargs | tr ' ' ,)" "$connections"

# ---------------------------------------------------------------------------------------------
section "io_uring"
kver=$(uname -r)
kmajor=${kver%%.*}
krest=${kver#*.}
kminor=${krest%%[!0-9]*}
if [ "$kmajor" -gt 5 ] || { [ "$kmajor" -eq 5 ] && [ "$kminor" -ge 8 ]; }; then
    ok "kernel $kver >= 5.8 (glommio 0.9's minimum)"
else
    change "kernel $kver is older than 5.8: glommio 0.9 cannot run" \
        "install a 5.15+ (preferably 6.1+) kernel, e.g. on Debian: apt-get install linux-image-amd64"
fi
disabled=$(readf /proc/sys/kernel/io_uring_disabled absent)
case "$disabled" in
    0 | absent) ok "kernel.io_uring_disabled = $disabled (io_uring allowed)" ;;
    1) change "kernel.io_uring_disabled = 1: only members of group kernel.io_uring_group ($(readf /proc/sys/kernel/io_uring_group '?')) may create rings" \
        "sysctl -w kernel.io_uring_disabled=0   # or: sysctl -w kernel.io_uring_group=<gid of the corecast user>" ;;
    *) change "kernel.io_uring_disabled = $disabled: io_uring is disabled for every process" \
        "sysctl -w kernel.io_uring_disabled=0   # and persist it in /etc/sysctl.d/ (see tuning/sysctl.conf)" ;;
esac
# Functional probe: io_uring_setup(2) is syscall 425 on every architecture.
if command -v python3 >/dev/null 2>&1; then
    probe=$(python3 - <<'EOF' 2>/dev/null
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 4, params)
if fd >= 0:
    os.close(fd)
    print("ok")
else:
    print(os.strerror(ctypes.get_errno()))
EOF
)
    case "$probe" in
        ok) ok "io_uring_setup() works in this context (no seccomp filter blocks it)" ;;
        '') note "could not probe io_uring_setup() (python3 failed)" ;;
        *) change "io_uring_setup() fails here: $probe. In a container this is the seccomp profile (Docker >= 25 and containerd block io_uring_* by default)" \
            "docker run --security-opt seccomp=/etc/docker/corecast-seccomp.json ...   # default profile + io_uring_setup, io_uring_enter, io_uring_register" \
            "docker run --security-opt seccomp=unconfined ...                           # simplest, least isolated" ;;
    esac
else
    note "python3 not found: io_uring_setup() not probed"
fi

# ---------------------------------------------------------------------------------------------
section "locked memory (memlock)"
ml_soft=$(ulimit -Sl)
ml_hard=$(ulimit -Hl)
capeff=$(awk '/^CapEff:/ {print $2}' /proc/self/status 2>/dev/null)
ipc_lock=0
if [ -n "$capeff" ] && [ $(((16#$capeff >> 14) & 1)) -eq 1 ]; then ipc_lock=1; fi
thp=$(readf /sys/kernel/mm/transparent_hugepage/enabled "")
thp_mode=$(echo "$thp" | sed -n 's/.*\[\(.*\)\].*/\1/p')
# Measured (tuning/README.md): each shard registers its 256 KiB io_memory with three rings; when
# mimalloc's arena sits in transparent huge pages the kernel charges the whole 2 MiB page per ring
# (6-7 MiB per shard in practice); without huge pages 768 KiB. Budgets below include headroom.
if [ "$thp_mode" = never ]; then per_shard=1024; measured="768 KiB"; else per_shard=8192; measured="6-7 MiB"; fi
need=$((shards * per_shard))
ml_soft_k=$ml_soft
[ "$ml_soft" = unlimited ] && ml_soft_k=999999999
memlock_fix1="systemd: LimitMEMLOCK=infinity in the [Service] section"
memlock_fix2="shell:   ulimit -l unlimited   (hard limit: /etc/security/limits.d/corecast.conf: 'corecast - memlock unlimited')"
memlock_fix3="docker:  docker run --ulimit memlock=-1:-1 ..."
if [ "$ml_soft_k" -lt 512 ]; then
    change "memlock soft limit is $ml_soft KiB (hard $ml_hard): below glommio's 512 KiB minimum, every shard fails to start (MemLockLimit)" \
        "$memlock_fix1" "$memlock_fix2" "$memlock_fix3"
elif [ "$ipc_lock" = 1 ]; then
    ok "memlock soft $ml_soft KiB >= 512 KiB, and CAP_IPC_LOCK is held: registered io_uring buffers are not charged"
elif [ "$ml_soft_k" -lt "$need" ]; then
    change "memlock soft limit $ml_soft KiB: $shards shard(s) need about $(kib "$need") pinned for their registered io_uring buffers (measured $measured each with THP '$thp_mode', budget $(kib $per_shard)); past the limit glommio logs 'registering buffers ... Skipping' and the history log runs without fixed buffers" \
        "$memlock_fix1   (or AmbientCapabilities=CAP_IPC_LOCK: pinned pages are then not charged)" \
        "$memlock_fix2" "$memlock_fix3" \
        "or shrink the charge to 768 KiB per shard: MIMALLOC_ARENA_EAGER_COMMIT=0 in corecast's environment"
else
    ok "memlock soft limit $ml_soft KiB covers $shards shard(s) x $(kib $per_shard)"
fi

# ---------------------------------------------------------------------------------------------
section "open files (nofile)"
nf_soft=$(ulimit -Sn)
nf_hard=$(ulimit -Hn)
nf_need=$((connections + 16 * shards + 64))
nr_open=$(readf /proc/sys/fs/nr_open 1048576)
file_max=$(readf /proc/sys/fs/file-max 0)
nf_soft_n=$nf_soft
[ "$nf_soft" = unlimited ] && nf_soft_n=$nr_open
if [ "$nf_soft_n" -lt "$nf_need" ]; then
    change "nofile soft limit $nf_soft (hard $nf_hard) < $nf_need = $connections connections + 16 per shard + 64; corecast does not raise its own soft limit, and accept() fails with EMFILE past it" \
        "systemd: LimitNOFILE=1048576 in the [Service] section" \
        "shell:   ulimit -n $((nf_need > nf_hard ? nf_need : nf_hard))   (raise the hard limit in /etc/security/limits.d/corecast.conf: 'corecast - nofile 1048576')" \
        "docker:  docker run --ulimit nofile=1048576:1048576 ..."
else
    ok "nofile soft limit $nf_soft >= $nf_need needed for $connections connections"
fi
if [ "$nr_open" -lt "$nf_need" ]; then
    change "fs.nr_open = $nr_open caps every process's nofile below $nf_need" "sysctl -w fs.nr_open=1048576"
fi
if [ "$file_max" -lt $((nf_need + 65536)) ]; then
    change "fs.file-max = $file_max (system-wide) leaves less than 64 Ki files for the rest of the host beside corecast's $nf_need" \
        "sysctl -w fs.file-max=4194304"
fi

# ---------------------------------------------------------------------------------------------
section "listen backlog"
somaxconn=$(readf /proc/sys/net/core/somaxconn 0)
synbl=$(readf /proc/sys/net/ipv4/tcp_max_syn_backlog 0)
if [ "$somaxconn" -ge 4096 ]; then
    ok "net.core.somaxconn = $somaxconn >= 4096 (corecast's listen backlog per shard)"
else
    change "net.core.somaxconn = $somaxconn caps corecast's 4096 backlog: a reconnect storm overflows the accept queue (ListenOverflows)" \
        "sysctl -w net.core.somaxconn=4096"
fi
syncookies=$(readf /proc/sys/net/ipv4/tcp_syncookies 1)
if [ "$syncookies" != 0 ]; then
    ok "net.ipv4.tcp_syncookies = $syncookies: the SYN queue is bounded by the listen backlog, SYN cookies beyond it (tcp_max_syn_backlog = $synbl only applies without cookies)"
elif [ "$synbl" -ge 4096 ]; then
    ok "SYN cookies off, net.ipv4.tcp_max_syn_backlog = $synbl >= 4096"
else
    change "SYN cookies off and net.ipv4.tcp_max_syn_backlog = $synbl: the kernel drops SYNs once the SYN queue is 3/4 of that during a connect storm" \
        "sysctl -w net.ipv4.tcp_max_syn_backlog=8192   # or: sysctl -w net.ipv4.tcp_syncookies=1"
fi

# ---------------------------------------------------------------------------------------------
section "ephemeral ports"
read -r plo phi < /proc/sys/net/ipv4/ip_local_port_range
nports=$((phi - plo + 1))
if [ "$loadgen" = 1 ]; then
    if [ "$nports" -ge 60000 ]; then
        ok "ip_local_port_range $plo-$phi: $nports ports per (source IP, server IP:port)"
    else
        change "ip_local_port_range $plo-$phi gives $nports client ports per (source IP, server IP:port); the load generator needs one per connection" \
            "sysctl -w net.ipv4.ip_local_port_range='1024 65535'   # and/or more source addresses (loadtest --src-addrs)"
    fi
else
    note "ip_local_port_range $plo-$phi ($nports ports): only outgoing connections use it (Postgres, a load generator on this host: run with --loadgen)"
fi

# ---------------------------------------------------------------------------------------------
section "TCP memory"
pg=$(getconf PAGESIZE)
read -r wmin wdef wmax < /proc/sys/net/ipv4/tcp_wmem
read -r rmin rdef rmax < /proc/sys/net/ipv4/tcp_rmem
read -r mlow mpress mhigh < /proc/sys/net/ipv4/tcp_mem
high_b=$((mhigh * pg))
ok "tcp_wmem $wmin $wdef $wmax, tcp_rmem $rmin $rdef $rmax, tcp_mem $mlow $mpress $mhigh pages ($(kib $((mpress * pg / 1024))) pressure, $(kib $((high_b / 1024))) limit)"
note "one stalled subscriber can hold $(kib $(((max_queue + wmax) / 1024))) before corecast cuts it: --max-queue-bytes $max_queue in corecast plus up to tcp_wmem max $wmax in the kernel; the tcp_mem limit fits $((high_b / (max_queue + wmax))) such subscribers at once"
if [ "$high_b" -lt $((connections * wdef)) ]; then
    change "tcp_mem limit ($(kib $((high_b / 1024)))) cannot hold even the default send buffer ($wdef B) of $connections connections" \
        "sysctl -w net.ipv4.tcp_mem='$((connections * wdef / pg)) $((connections * wdef * 3 / 2 / pg)) $((connections * wdef * 2 / pg))'"
fi

# ---------------------------------------------------------------------------------------------
section "CPUs"
want=$ncpu
[ "$database" = 1 ] && want=$((ncpu - 1))
[ "$want" -ge 1 ] || want=1
if [ "$shards" -gt "$ncpu" ]; then
    change "$shards shards on $ncpu CPUs: shards would share cores (corecast pins shard i to CPU i mod $ncpu)" \
        "corecast --shards $want"
else
    ok "$ncpu CPUs online ($(readf /sys/devices/system/cpu/online)); $shards shard(s) planned; default would be $want$([ "$database" = 1 ] && echo ' (one core left for the Postgres ingest thread)')"
fi
for c in $shard_cpus; do
    if ! in_list "$c" "$online"; then
        change "shard CPU $c is not online: that shard fails to start" "corecast --cpus $(echo "$online" | xargs | tr ' ' ,)"
    fi
done
isolated=$(readf /sys/devices/system/cpu/isolated "")
nohz=$(readf /sys/devices/system/cpu/nohz_full "")
if [ -n "$isolated" ]; then
    ok "isolated CPUs: $isolated (nohz_full: ${nohz:-none}); pin shards there with corecast --cpus $isolated"
    for c in $shard_cpus; do
        in_list "$c" "$(expand_cpus "$isolated")" || note "shard CPU $c is not isolated"
    done
elif [ -n "$housekeeping" ]; then
    shard_list=$(echo "$shard_cpus" | xargs | tr ' ' ,)
    hk_list=$(echo "$housekeeping" | tr ' ' ,)
    note "no isolated CPUs: the scheduler may run other work on shard CPUs $shard_list (optional on a dedicated host)" \
        "kernel command line: isolcpus=managed_irq,domain,$shard_list nohz_full=$shard_list rcu_nocbs=$shard_list   (then start corecast with --cpus $shard_list)" \
        "or with cgroups, no reboot: keep system.slice, user.slice and init.scope on CPUs $hk_list and run corecast in its own slice (tuning/README.md, CPU isolation)"
else
    note "no isolated CPUs, and every CPU runs a shard: isolation needs a housekeeping CPU (e.g. corecast --shards $((ncpu > 1 ? ncpu - 1 : 1)) --cpus $([ "$ncpu" -gt 2 ] && echo "1-$((ncpu - 1))" || echo 1), then isolate those)"
fi

# ---------------------------------------------------------------------------------------------
section "NIC interrupts and RPS"
if pgrep -x irqbalance >/dev/null 2>&1; then
    note "irqbalance is running: it moves IRQs onto shard cores unless told not to" \
        "echo 'IRQBALANCE_BANNED_CPULIST=$(echo "$shard_cpus" | xargs | tr ' ' ,)' >> /etc/default/irqbalance && systemctl restart irqbalance"
fi
found_nic=0
for dev in /sys/class/net/*; do
    ifc=${dev##*/}
    [ -e "$dev/device" ] || continue
    found_nic=1
    d=$(readlink -f "$dev/device")
    irqdir=""
    for p in "$d" "$d/.."; do [ -d "$p/msi_irqs" ] && { irqdir="$p/msi_irqs"; break; }; done
    summary=""
    on_shard=""
    if [ -n "$irqdir" ]; then
        for f in "$irqdir"/*; do
            irq=${f##*/}
            aff=$(readf "/proc/irq/$irq/effective_affinity_list" "$(readf "/proc/irq/$irq/smp_affinity_list" '?')")
            count=$(awk -v i="$irq:" '$1 == i { s = 0; for (k = 2; k <= NF && $k ~ /^[0-9]+$/; k++) s += $k; print s }' /proc/interrupts)
            summary="$summary $irq->cpu$aff(${count:-0})"
            for c in $(expand_cpus "$aff"); do in_list "$c" "$shard_cpus" && on_shard="$on_shard $irq"; done
        done
    fi
    rps=""
    for q in "$dev"/queues/rx-*; do
        [ -r "$q/rps_cpus" ] || continue
        m=$(tr -d ',\n' < "$q/rps_cpus")
        case "$m" in *[!0]*) rps="$rps ${q##*/}=$m" ;; esac
    done
    if [ -z "$irqdir" ]; then
        note "$ifc: no MSI IRQ list in sysfs; see /proc/interrupts"
        continue
    fi
    note "$ifc IRQs (irq->cpu(count)):$summary; RPS: ${rps:-off}"
    if [ -n "$on_shard" ]; then
        if [ -n "$housekeeping" ]; then
            change "$ifc IRQs$on_shard are served on shard CPUs while CPUs $housekeeping are free of shards" \
                "for i in$on_shard; do echo $(echo "$housekeeping" | tr ' ' ,) > /proc/irq/\$i/smp_affinity_list; done"
        else
            note "$ifc IRQs run on shard CPUs (every CPU has a shard): spread them one queue per shard core (ethtool -L $ifc combined $shards), or leave a core for IRQs with --shards $((shards > 1 ? shards - 1 : 1))"
        fi
    fi
done
[ "$found_nic" = 1 ] || note "no physical network interface found"

# ---------------------------------------------------------------------------------------------
section "transparent hugepages"
defrag=$(readf /sys/kernel/mm/transparent_hugepage/defrag "" | sed -n 's/.*\[\(.*\)\].*/\1/p')
case "$thp_mode" in
    '') note "no THP interface" ;;
    always) change "THP enabled = always: every heap and stack region may be backed by 2 MiB pages (RSS per idle connection rises; khugepaged and compaction add latency)" \
        "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled" ;;
    madvise) ok "THP enabled = madvise (mimalloc requests huge pages for its arena: +2 MiB pinned per io_uring ring, see memlock)" ;;
    never) ok "THP enabled = never" ;;
esac
case "$defrag" in
    always) change "THP defrag = always: page faults may stall in direct compaction" \
        "echo defer+madvise > /sys/kernel/mm/transparent_hugepage/defrag" ;;
    '') ;;
    *) ok "THP defrag = $defrag" ;;
esac

# ---------------------------------------------------------------------------------------------
section "CPU frequency"
govs=$(cat /sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor 2>/dev/null | sort | uniq -c | xargs)
if [ -z "$govs" ]; then
    note "no cpufreq interface (virtual machine, or frequency managed by firmware)"
elif echo "$govs" | grep -qv performance; then
    change "CPU governors: $govs; a shard that idles between bursts wakes at low frequency" \
        "cpupower frequency-set -g performance   # or: echo performance | tee /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor"
else
    ok "CPU governors: $govs"
fi

printf '\n'
if [ "$changes" -eq 0 ]; then
    echo "Nothing to change."
    exit 0
fi
echo "$changes change(s) recommended (see tuning/README.md for the reasons)."
exit 1
