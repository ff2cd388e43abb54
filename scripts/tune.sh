#!/usr/bin/env bash
# tune.sh: check, apply and revert the kernel and open-file settings megasock needs to hold
# N WebSocket connections on one Linux box. `scripts/tune.sh --help` lists the verbs and exit
# codes; docs/TUNING.md explains every number.
set -euo pipefail

# --- per-connection memory figures (bytes) ------------------------------------------------
# megasock's own user-space memory per idle connection. Comes from docs/PERFORMANCE.md's
# idle-memory measurement (server RSS growth per idle connection); update it when that
# measurement changes. `megasock plan` must use the same number.
MEGASOCK_CONN_BYTES=128
# Kernel slab per idle ESTABLISHED socket, measured on Linux 6.18 (TCP sock 2368 + sock_inode
# 832 + filp 192 + dentry 192 + LSM blobs + bind bucket share; no skb while idle).
KERNEL_SOCK_BYTES=3907
# Slab growth per socket registered with epoll_ctl(ADD) (eventpoll_epi and bookkeeping), measured.
EPOLL_WATCH_BYTES=216
# One pointer per open fd in the process fd table.
FD_TABLE_BYTES=8

# --- targets ------------------------------------------------------------------------------
# Above this many connections, stock defaults (listen queues, per-socket default buffers) stop
# being enough and the "large" targets below apply.
LARGE_N=65536
BACKLOG_SMALL=4096          # kernel default somaxconn since 5.4, and megasock's default --backlog
BACKLOG_LARGE=65535         # absorbs a reconnect storm; pass the same value to megasock --backlog
NETDEV_BACKLOG_SMALL=1000   # kernel default
NETDEV_BACKLOG_LARGE=16384  # per-CPU packet queue ahead of the stack during connect bursts
TCP_RMEM_MIN=4096           # per-socket floor guaranteed under memory pressure
TCP_RMEM_DEFAULT=16384      # initial receive buffer: caps unread input per socket (large N)
TCP_WMEM_MIN=4096
TCP_WMEM_DEFAULT=16384      # initial send buffer: caps kernel-queued output per socket (large N)
PORT_RANGE_LOW=10000        # load generators: ephemeral ports 10000-65535 (55,536 per destination)
PORT_RANGE_HIGH=65535

# --- exit codes ---------------------------------------------------------------------------
EXIT_OK=0
EXIT_SHORT=1      # check: at least one setting falls short
EXIT_USAGE=2      # bad arguments
EXIT_FAIL=3       # cannot read or write what is needed (missing key, not root, write failed)
EXIT_NOTHING=4    # revert: no saved state to restore

PROG=${0##*/}

usage() {
    cat <<EOF
Usage:
  $PROG check  --connections N [--role server|loadgen|both] [--pid PID] [--root DIR]
  $PROG apply  --connections N [--role server|loadgen|both] [--dry-run] [--root DIR]
  $PROG revert [--dry-run] [--root DIR]
  $PROG --help

Verbs:
  check   Read the live values (/proc/sys, and the open-file limits of this shell or of
          --pid PID), print a table "setting current needed ok", estimate the memory N
          connections need, and exit 1 if anything falls short. Needs no root.
  apply   Compute the settings for N connections (never lowering a limit that is already
          higher), save the current values, write /etc/sysctl.d/99-megasock.conf and
          /etc/security/limits.d/99-megasock.conf, and load them with sysctl -p.
          Needs root. --dry-run prints what would change and changes nothing.
  revert  Restore the values and files saved by the first apply, then forget them.

Options:
  --connections N  connections to hold (1 to 100000000)
  --role R         server (default): the megasock box; loadgen: a load-generator box
                   (port range, tcp_tw_reuse, client nofile instead of listen queues);
                   both: server and load generator on one box (loopback tests)
  --pid PID        check the open-file limits of a running process instead of this shell
  --root DIR       act on DIR/proc/sys, DIR/proc/*/limits, DIR/proc/meminfo, DIR/etc and
                   DIR/var/lib/megasock-tune instead of the live system (for tests); apply
                   then writes values into DIR/proc/sys files instead of calling sysctl
  --dry-run        apply/revert: show the changes, change nothing

Exit codes:
  0  ok (check: everything suffices; apply/revert: done)
  1  check: at least one setting falls short
  2  usage error
  3  cannot read or write something needed (missing key, not root, write failed)
  4  revert: nothing saved to restore

Memory estimate (bytes), S = sockets on this box (N, or 2N for --role both):
  idle = N_server * ($KERNEL_SOCK_BYTES + $EPOLL_WATCH_BYTES + $FD_TABLE_BYTES + MEGASOCK_CONN_BYTES=$MEGASOCK_CONN_BYTES) + N_client * ($KERNEL_SOCK_BYTES + $EPOLL_WATCH_BYTES + $FD_TABLE_BYTES)
  busy = idle + S * (tcp_rmem[min] + tcp_wmem[min])
See docs/TUNING.md.
EOF
}

die() { # code message...
    local code=$1
    shift
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit "$code"
}

usage_error() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    printf 'Try "%s --help".\n' "$PROG" >&2
    exit "$EXIT_USAGE"
}

# --- argument parsing ---------------------------------------------------------------------
VERB=""
CONNECTIONS=""
ROLE=server
PID_ARG=""
ROOT=""
ROOT_GIVEN=0
DRY_RUN=0

parse_args() {
    if [[ $# -eq 0 ]]; then
        usage_error "missing verb (check, apply or revert)"
    fi
    case $1 in
        -h | --help)
            usage
            exit "$EXIT_OK"
            ;;
        check | apply | revert) VERB=$1 ;;
        *) usage_error "unknown verb: $1" ;;
    esac
    shift
    while [[ $# -gt 0 ]]; do
        case $1 in
            -h | --help)
                usage
                exit "$EXIT_OK"
                ;;
            --connections | --role | --pid | --root)
                [[ $# -ge 2 ]] || usage_error "$1 needs a value"
                set_option "$1" "$2"
                shift 2
                ;;
            --connections=* | --role=* | --pid=* | --root=*)
                set_option "${1%%=*}" "${1#*=}"
                shift
                ;;
            --dry-run)
                DRY_RUN=1
                shift
                ;;
            *) usage_error "unknown option: $1" ;;
        esac
    done

    case $VERB in
        check)
            [[ -n $CONNECTIONS ]] || usage_error "check needs --connections N"
            [[ $DRY_RUN -eq 0 ]] || usage_error "--dry-run applies to apply and revert only"
            ;;
        apply)
            [[ -n $CONNECTIONS ]] || usage_error "apply needs --connections N"
            [[ -z $PID_ARG ]] || usage_error "--pid applies to check only"
            ;;
        revert)
            [[ -z $CONNECTIONS ]] || usage_error "revert takes no --connections"
            [[ -z $PID_ARG ]] || usage_error "--pid applies to check only"
            ;;
    esac
}

set_option() { # name value
    case $1 in
        --connections)
            if ! [[ $2 =~ ^[1-9][0-9]{0,8}$ ]] || ((10#$2 > 100000000)); then
                usage_error "--connections must be an integer from 1 to 100000000, got '$2'"
            fi
            CONNECTIONS=$((10#$2))
            ;;
        --role)
            case $2 in
                server | loadgen | both) ROLE=$2 ;;
                *) usage_error "--role must be server, loadgen or both, got '$2'" ;;
            esac
            ;;
        --pid)
            [[ $2 =~ ^[1-9][0-9]*$ ]] || usage_error "--pid must be a process id, got '$2'"
            PID_ARG=$2
            ;;
        --root)
            [[ -n $2 ]] || usage_error "--root needs a directory"
            [[ -d $2 ]] || usage_error "--root: not a directory: $2"
            ROOT=${2%/}
            # --root / is the live system: behave exactly as without --root (sysctl, root check).
            if [[ -n $ROOT ]]; then ROOT_GIVEN=1; else ROOT_GIVEN=0; fi
            ;;
    esac
}

# --- reading values -----------------------------------------------------------------------
sysctl_path() { # key -> path of its /proc/sys file (under ROOT)
    printf '%s/proc/sys/%s' "$ROOT" "${1//.//}"
}

# Prints the value of a sysctl with its fields separated by single spaces; fails if absent.
read_sysctl() {
    local path raw
    local -a fields
    path=$(sysctl_path "$1")
    [[ -r $path ]] || return 1
    raw=$(<"$path") || return 1
    read -r -a fields <<<"$raw" || true
    [[ ${#fields[@]} -gt 0 ]] || return 1
    printf '%s' "${fields[*]}"
}

# Field I (0-based) of a space-separated value.
field() {
    local -a fields
    read -r -a fields <<<"$1" || true
    printf '%s' "${fields[$2]:-}"
}

# Prints "soft hard" from the "Max open files" line of a /proc/PID/limits file.
read_nofile() {
    local file=$1 line
    local -a fields
    [[ -r $file ]] || return 1
    while IFS= read -r line; do
        if [[ $line == "Max open files"* ]]; then
            read -r -a fields <<<"${line#Max open files}" || true
            [[ ${#fields[@]} -ge 2 ]] || return 1
            printf '%s %s' "${fields[0]}" "${fields[1]}"
            return 0
        fi
    done <"$file"
    return 1
}

# MemTotal in bytes from meminfo; fails if unknown.
read_memtotal() {
    local file=$ROOT/proc/meminfo key value unit
    [[ -r $file ]] || return 1
    while read -r key value unit; do
        if [[ $key == "MemTotal:" && $value =~ ^[0-9]+$ ]]; then
            if [[ $unit == kB ]]; then
                printf '%s' $((value * 1024))
            else
                printf '%s' "$value"
            fi
            return 0
        fi
    done <"$file"
    return 1
}

page_size() {
    local p
    p=$(getconf PAGESIZE 2>/dev/null) || p=4096
    [[ $p =~ ^[0-9]+$ && $p -gt 0 ]] || p=4096
    printf '%s' "$p"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
max() { if (($1 > $2)); then printf '%s' "$1"; else printf '%s' "$2"; fi; }
min() { if (($1 < $2)); then printf '%s' "$1"; else printf '%s' "$2"; fi; }
ceil_div() { printf '%s' $((($1 + $2 - 1) / $2)); }
gib() { printf '%d.%02d' $(($1 / 1073741824)) $((($1 % 1073741824) * 100 / 1073741824)); }

# --- what N connections need --------------------------------------------------------------
# Sets the N_* globals from CONNECTIONS and ROLE.
compute_needs() {
    local n=$CONNECTIONS
    N_SERVER=0
    N_CLIENT=0
    case $ROLE in
        server) N_SERVER=$n ;;
        loadgen) N_CLIENT=$n ;;
        both)
            N_SERVER=$n
            N_CLIENT=$n
            ;;
    esac
    SOCKETS=$((N_SERVER + N_CLIENT))
    # Per process: N sockets + 10% headroom + 1024 for listeners, epoll, wakers, logs.
    NEED_NOFILE=$((n + n / 10 + 1024))
    # Whole box: every megasock-related socket with the same headroom.
    NEED_FDS=$((SOCKETS + SOCKETS / 10 + 1024))
    NEED_FILE_MAX=$((2 * NEED_FDS))
    NEED_WATCHES=$NEED_FDS
    NEED_CONNTRACK=$((2 * n))
    if ((n > LARGE_N)); then
        LARGE=1
        NEED_BACKLOG=$BACKLOG_LARGE
        NEED_NETDEV=$NETDEV_BACKLOG_LARGE
    else
        LARGE=0
        NEED_BACKLOG=$BACKLOG_SMALL
        NEED_NETDEV=$NETDEV_BACKLOG_SMALL
    fi
    PAGE=$(page_size)
    KERNEL_PER_SOCKET=$((KERNEL_SOCK_BYTES + EPOLL_WATCH_BYTES + FD_TABLE_BYTES))
}

# tcp_mem targets in pages for given rmem/wmem minimums: "min pressure max".
tcp_mem_needs() { # rmem_min wmem_min
    local b
    b=$(ceil_div $((SOCKETS * ($1 + $2))) "$PAGE")
    printf '%s %s %s' $((b / 2)) "$b" $((b + b / 2))
}

# Memory estimate for the given rmem/wmem minimums; sets MEM_IDLE and MEM_BUSY.
memory_estimate() { # rmem_min wmem_min
    MEM_IDLE=$((N_SERVER * (KERNEL_PER_SOCKET + MEGASOCK_CONN_BYTES) + N_CLIENT * KERNEL_PER_SOCKET))
    MEM_BUSY=$((MEM_IDLE + SOCKETS * ($1 + $2)))
}

role_has_server() { [[ $ROLE == server || $ROLE == both ]]; }
role_has_loadgen() { [[ $ROLE == loadgen || $ROLE == both ]]; }

# --- check --------------------------------------------------------------------------------
ROWS=()
FAILED=0
CHECKED=0

# add_row NAME CURRENT OP NEEDED [optional]
#   OP: ge, le, eq, or na (not applicable). CURRENT "-" means unreadable: "no", or "n/a"
#   when the fifth argument is "optional" (the setting does not exist on this box).
add_row() {
    local name=$1 cur=$2 op=$3 need=$4 opt=${5:-} shown ok
    case $op in
        ge) shown=">=$need" ;;
        le) shown="<=$need" ;;
        eq) shown="=$need" ;;
        *) shown="-" ;;
    esac
    if [[ $op == na ]]; then
        ok=n/a
    elif [[ $cur == "-" ]]; then
        if [[ $opt == optional ]]; then ok=n/a; else ok=no; fi
    else
        local v=$cur
        [[ $v == unlimited ]] && v=9223372036854775807
        if ! is_uint "$v"; then
            ok=no
        else
            case $op in
                ge) if ((v >= need)); then ok=yes; else ok=no; fi ;;
                le) if ((v <= need)); then ok=yes; else ok=no; fi ;;
                eq) if ((v == need)); then ok=yes; else ok=no; fi ;;
            esac
        fi
    fi
    if [[ $ok != n/a ]]; then
        CHECKED=$((CHECKED + 1))
        [[ $ok == yes ]] || FAILED=$((FAILED + 1))
    fi
    ROWS+=("$(printf '%-36s %-20s %-20s %s' "$name" "$cur" "$shown" "$ok")")
}

sysctl_or_dash() { read_sysctl "$1" || printf -- '-'; }

do_check() {
    compute_needs
    local v limits_file limits_label nofile soft hard memtotal
    local rmin=$TCP_RMEM_MIN wmin=$TCP_WMEM_MIN rdef="-" wdef="-"

    if [[ -n $PID_ARG ]]; then
        limits_file=$ROOT/proc/$PID_ARG/limits
        limits_label="pid $PID_ARG"
    else
        limits_file=$ROOT/proc/self/limits
        limits_label="this shell"
    fi
    if nofile=$(read_nofile "$limits_file"); then
        soft=$(field "$nofile" 0)
        hard=$(field "$nofile" 1)
    else
        [[ -z $PID_ARG ]] || die "$EXIT_FAIL" "cannot read the limits of pid $PID_ARG ($limits_file)"
        printf '%s: warning: cannot read %s\n' "$PROG" "$limits_file" >&2
        soft="-"
        hard="-"
    fi

    printf '# megasock tune check: role=%s connections=%s root=%s limits=%s\n' \
        "$ROLE" "$CONNECTIONS" "${ROOT:-/}" "${limits_label// /_}"
    printf '%-36s %-20s %-20s %s\n' setting current needed ok

    add_row fs.file-max "$(sysctl_or_dash fs.file-max)" ge "$NEED_FILE_MAX"
    add_row fs.nr_open "$(sysctl_or_dash fs.nr_open)" ge "$NEED_NOFILE"
    add_row fs.epoll.max_user_watches "$(sysctl_or_dash fs.epoll.max_user_watches)" ge "$NEED_WATCHES"
    # The server raises its soft limit to the hard one at start, so for the server role only
    # the hard limit of the launching shell matters; a running process (--pid) or a load
    # generator needs the soft limit itself.
    if [[ -n $PID_ARG ]] || role_has_loadgen; then
        add_row nofile.soft "$soft" ge "$NEED_NOFILE"
    else
        add_row nofile.soft "$soft" na 0
    fi
    add_row nofile.hard "$hard" ge "$NEED_NOFILE"

    if role_has_server; then
        add_row net.core.somaxconn "$(sysctl_or_dash net.core.somaxconn)" ge "$NEED_BACKLOG"
        # With syncookies (the default) a full SYN queue does not drop clients; the queue only
        # needs to grow for large N, where a reconnect storm would otherwise cost cookie overhead.
        if ((LARGE)); then
            add_row net.ipv4.tcp_max_syn_backlog "$(sysctl_or_dash net.ipv4.tcp_max_syn_backlog)" ge "$NEED_BACKLOG"
        else
            add_row net.ipv4.tcp_max_syn_backlog "$(sysctl_or_dash net.ipv4.tcp_max_syn_backlog)" na 0
        fi
        add_row net.core.netdev_max_backlog "$(sysctl_or_dash net.core.netdev_max_backlog)" ge "$NEED_NETDEV"
    fi
    if role_has_loadgen; then
        local lo="-" hi="-"
        if v=$(read_sysctl net.ipv4.ip_local_port_range); then
            lo=$(field "$v" 0)
            hi=$(field "$v" 1)
        fi
        add_row 'net.ipv4.ip_local_port_range[low]' "$lo" le "$PORT_RANGE_LOW"
        add_row 'net.ipv4.ip_local_port_range[high]' "$hi" ge "$PORT_RANGE_HIGH"
        add_row net.ipv4.tcp_tw_reuse "$(sysctl_or_dash net.ipv4.tcp_tw_reuse)" eq 1
    fi

    local rcur="-" wcur="-"
    if v=$(read_sysctl net.ipv4.tcp_rmem); then
        rcur=$(field "$v" 0)
        rdef=$(field "$v" 1)
        is_uint "$rcur" && rmin=$rcur
    fi
    if v=$(read_sysctl net.ipv4.tcp_wmem); then
        wcur=$(field "$v" 0)
        wdef=$(field "$v" 1)
        is_uint "$wcur" && wmin=$wcur
    fi
    add_row 'net.ipv4.tcp_rmem[min]' "$rcur" le "$TCP_RMEM_MIN"
    if ((LARGE)); then
        add_row 'net.ipv4.tcp_rmem[default]' "${rdef:--}" le "$TCP_RMEM_DEFAULT"
    else
        add_row 'net.ipv4.tcp_rmem[default]' "${rdef:--}" na 0
    fi
    add_row 'net.ipv4.tcp_wmem[min]' "$wcur" le "$TCP_WMEM_MIN"
    if ((LARGE)); then
        add_row 'net.ipv4.tcp_wmem[default]' "${wdef:--}" le "$TCP_WMEM_DEFAULT"
    else
        add_row 'net.ipv4.tcp_wmem[default]' "${wdef:--}" na 0
    fi

    local mem_need pcur="-" mcur="-"
    mem_need=$(tcp_mem_needs "$rmin" "$wmin")
    if v=$(read_sysctl net.ipv4.tcp_mem); then
        pcur=$(field "$v" 1)
        mcur=$(field "$v" 2)
    fi
    add_row 'net.ipv4.tcp_mem[pressure]' "${pcur:--}" ge "$(field "$mem_need" 1)"
    add_row 'net.ipv4.tcp_mem[max]' "${mcur:--}" ge "$(field "$mem_need" 2)"

    add_row net.netfilter.nf_conntrack_max "$(sysctl_or_dash net.netfilter.nf_conntrack_max)" \
        ge "$NEED_CONNTRACK" optional

    memory_estimate "$rmin" "$wmin"
    memtotal=$(read_memtotal) || memtotal="-"
    add_row memory.total "$memtotal" ge "$MEM_BUSY" optional

    for v in "${ROWS[@]}"; do
        printf '%s\n' "$v"
    done

    printf '# memory: connections=%s sockets=%s kernel_per_socket=%s megasock_per_conn=%s buffers_per_socket=%s\n' \
        "$CONNECTIONS" "$SOCKETS" "$KERNEL_PER_SOCKET" "$MEGASOCK_CONN_BYTES" $((rmin + wmin))
    printf '# memory: idle_bytes=%s idle_gib=%s busy_bytes=%s busy_gib=%s\n' \
        "$MEM_IDLE" "$(gib "$MEM_IDLE")" "$MEM_BUSY" "$(gib "$MEM_BUSY")"
    printf '# memory: idle = kernel slab %s + epoll watch %s + fd slot %s per socket, plus megasock %s per server connection;\n' \
        "$KERNEL_SOCK_BYTES" "$EPOLL_WATCH_BYTES" "$FD_TABLE_BYTES" "$MEGASOCK_CONN_BYTES"
    printf '# memory: busy = idle + tcp_rmem[min] %s + tcp_wmem[min] %s per socket (every socket holding data)\n' \
        "$rmin" "$wmin"
    if role_has_loadgen && [[ ${lo:-} =~ ^[0-9]+$ && ${hi:-} =~ ^[0-9]+$ ]] && ((hi >= lo)); then
        local ports=$((hi - lo + 1))
        printf '# loadgen: %s connections to one server ip:port need at least %s source addresses (%s ports each)\n' \
            "$N_CLIENT" "$(ceil_div "$N_CLIENT" "$ports")" "$ports"
    fi
    if [[ $hard != "-" && $hard != unlimited ]] && is_uint "$hard" && ((hard < NEED_NOFILE)); then
        printf '# nofile: raise the open-file limit to %s (LimitNOFILE= in the systemd unit; limits.d for login shells, written by apply)\n' \
            "$NEED_NOFILE"
    fi
    if ((FAILED > 0)); then
        printf '# result: %s of %s settings fall short; fix: sudo %s apply --connections %s --role %s\n' \
            "$FAILED" "$CHECKED" "$0" "$CONNECTIONS" "$ROLE"
        return "$EXIT_SHORT"
    fi
    printf '# result: ok, %s settings suffice\n' "$CHECKED"
    return "$EXIT_OK"
}

# --- apply --------------------------------------------------------------------------------
SYSCTL_FILE_REL=etc/sysctl.d/99-megasock.conf
LIMITS_FILE_REL=etc/security/limits.d/99-megasock.conf
STATE_DIR_REL=var/lib/megasock-tune

PLAN_KEYS=()
declare -A PLAN_CUR=()
declare -A PLAN_NEW=()
declare -A PLAN_WHY=()

plan_key() { # key current new why
    PLAN_KEYS+=("$1")
    PLAN_CUR[$1]=$2
    PLAN_NEW[$1]=$3
    PLAN_WHY[$1]=$4
}

require() { # key -> value, or exit 3
    local v
    v=$(read_sysctl "$1") || die "$EXIT_FAIL" "cannot read $(sysctl_path "$1"): this kernel lacks $1 or /proc/sys is not mounted"
    printf '%s' "$v"
}

need_uint() { # key value
    is_uint "$2" || die "$EXIT_FAIL" "unexpected value for $1: '$2'"
}

# Fills PLAN_* with the keys for the role, their current and new values.
compute_plan() {
    compute_needs
    local v k cur

    for k in fs.file-max fs.nr_open fs.epoll.max_user_watches; do
        cur=$(require "$k")
        need_uint "$k" "$cur"
        case $k in
            fs.file-max) v=$NEED_FILE_MAX ;;
            fs.nr_open) v=$NEED_NOFILE ;;
            *) v=$NEED_WATCHES ;;
        esac
        plan_key "$k" "$cur" "$(max "$cur" "$v")" "$(why "$k")"
    done
    if role_has_server; then
        for k in net.core.somaxconn net.ipv4.tcp_max_syn_backlog net.core.netdev_max_backlog; do
            cur=$(require "$k")
            need_uint "$k" "$cur"
            case $k in
                net.core.netdev_max_backlog) v=$NEED_NETDEV ;;
                net.ipv4.tcp_max_syn_backlog) if ((LARGE)); then v=$NEED_BACKLOG; else v=$cur; fi ;;
                *) v=$NEED_BACKLOG ;;
            esac
            plan_key "$k" "$cur" "$(max "$cur" "$v")" "$(why "$k")"
        done
    fi

    local r w rmin rdef rmax wmin wdef wmax
    r=$(require net.ipv4.tcp_rmem)
    w=$(require net.ipv4.tcp_wmem)
    rmin=$(field "$r" 0) rdef=$(field "$r" 1) rmax=$(field "$r" 2)
    wmin=$(field "$w" 0) wdef=$(field "$w" 1) wmax=$(field "$w" 2)
    for v in "$rmin" "$rdef" "$rmax"; do need_uint net.ipv4.tcp_rmem "$v"; done
    for v in "$wmin" "$wdef" "$wmax"; do need_uint net.ipv4.tcp_wmem "$v"; done
    rmin=$(min "$rmin" "$TCP_RMEM_MIN")
    wmin=$(min "$wmin" "$TCP_WMEM_MIN")
    if ((LARGE)); then
        rdef=$(min "$rdef" "$TCP_RMEM_DEFAULT")
        wdef=$(min "$wdef" "$TCP_WMEM_DEFAULT")
    fi
    rmax=$(max "$rmax" "$rdef")
    wmax=$(max "$wmax" "$wdef")
    plan_key net.ipv4.tcp_rmem "$r" "$rmin $rdef $rmax" "$(why net.ipv4.tcp_rmem)"
    plan_key net.ipv4.tcp_wmem "$w" "$wmin $wdef $wmax" "$(why net.ipv4.tcp_wmem)"

    local m need i
    local -a cm nm
    m=$(require net.ipv4.tcp_mem)
    read -r -a cm <<<"$m" || true
    [[ ${#cm[@]} -eq 3 ]] || die "$EXIT_FAIL" "unexpected value for net.ipv4.tcp_mem: '$m'"
    need=$(tcp_mem_needs "$rmin" "$wmin")
    read -r -a nm <<<"$need" || true
    for i in 0 1 2; do
        need_uint net.ipv4.tcp_mem "${cm[$i]}"
        nm[i]=$(max "${cm[$i]}" "${nm[$i]}")
    done
    plan_key net.ipv4.tcp_mem "$m" "${nm[*]}" "$(why net.ipv4.tcp_mem)"

    if v=$(read_sysctl net.netfilter.nf_conntrack_max); then
        need_uint net.netfilter.nf_conntrack_max "$v"
        plan_key net.netfilter.nf_conntrack_max "$v" "$(max "$v" "$NEED_CONNTRACK")" \
            "$(why net.netfilter.nf_conntrack_max)"
    fi

    if role_has_loadgen; then
        local pr lo hi
        pr=$(require net.ipv4.ip_local_port_range)
        lo=$(field "$pr" 0) hi=$(field "$pr" 1)
        need_uint net.ipv4.ip_local_port_range "$lo"
        need_uint net.ipv4.ip_local_port_range "$hi"
        plan_key net.ipv4.ip_local_port_range "$pr" \
            "$(min "$lo" "$PORT_RANGE_LOW") $(max "$hi" "$PORT_RANGE_HIGH")" "$(why net.ipv4.ip_local_port_range)"
        cur=$(require net.ipv4.tcp_tw_reuse)
        plan_key net.ipv4.tcp_tw_reuse "$cur" 1 "$(why net.ipv4.tcp_tw_reuse)"
    fi
}

why() {
    case $1 in
        fs.file-max) printf 'system-wide open files: 2x the fds megasock needs, so the rest of the box never hits ENFILE; a cap, costs nothing until used' ;;
        fs.nr_open) printf 'per-process fd ceiling: RLIMIT_NOFILE cannot be raised above it; a cap, costs 8 B per fd actually open' ;;
        fs.epoll.max_user_watches) printf 'epoll registrations per user, one per socket; each costs about 216 B of slab' ;;
        net.core.somaxconn) printf 'accept-queue cap for listen(); megasock --backlog must not exceed it; entries cost memory only while queued' ;;
        net.ipv4.tcp_max_syn_backlog) printf 'half-open (SYN_RECV) queue per listener for connect storms; about 304 B per pending request' ;;
        net.core.netdev_max_backlog) printf 'per-CPU packet queue ahead of the TCP stack during connect bursts; memory only while full' ;;
        net.ipv4.tcp_rmem) printf 'min default max receive buffer per socket: 4 KiB floor, small default so unread input stays small, max kept for autotuning' ;;
        net.ipv4.tcp_wmem) printf 'min default max send buffer per socket: 4 KiB floor, small default so queued output stays small, max kept for autotuning' ;;
        net.ipv4.tcp_mem) printf 'pages for all TCP buffers (min pressure max): pressure = every socket holding its rmem+wmem minimums, max 1.5x that' ;;
        net.netfilter.nf_conntrack_max) printf 'conntrack table: 2 entries per connection of headroom (about 300 B each); or NOTRACK the port (docs/TUNING.md)' ;;
        net.ipv4.ip_local_port_range) printf 'load generator: ephemeral ports per (source ip, server ip:port); costs nothing' ;;
        net.ipv4.tcp_tw_reuse) printf 'load generator: reuse TIME_WAIT ports for new outgoing connections after reconnect storms' ;;
        *) printf '%s' "$1" ;;
    esac
}

write_file_atomic() { # path content
    local tmp
    mkdir -p "$(dirname "$1")" || return 1
    tmp=$(mktemp "$1.XXXXXX") || return 1
    if ! printf '%s' "$2" >"$tmp"; then
        rm -f "$tmp"
        return 1
    fi
    chmod 0644 "$tmp" && mv -f "$tmp" "$1"
}

sysctl_file_content() {
    local k
    printf '# Written by scripts/tune.sh apply --connections %s --role %s. Undo: scripts/tune.sh revert\n' \
        "$CONNECTIONS" "$ROLE"
    printf '# Values for %s connections; docs/TUNING.md explains each one.\n' "$CONNECTIONS"
    for k in "${PLAN_KEYS[@]}"; do
        printf '\n# %s\n' "${PLAN_WHY[$k]}"
        if [[ $k == net.netfilter.* ]]; then
            # "-": do not fail at boot if the conntrack module is not loaded yet.
            printf -- '-%s = %s\n' "$k" "${PLAN_NEW[$k]}"
        else
            printf '%s = %s\n' "$k" "${PLAN_NEW[$k]}"
        fi
    done
}

limits_file_content() {
    printf '# Written by scripts/tune.sh apply --connections %s --role %s. Undo: scripts/tune.sh revert\n' \
        "$CONNECTIONS" "$ROLE"
    printf '# Open files for login sessions (pam_limits), %s connections + 10%% + 1024.\n' "$CONNECTIONS"
    printf '# systemd services ignore this file: set LimitNOFILE=%s in the unit.\n' "$NEED_NOFILE"
    printf '# "*" does not cover root, hence the root lines.\n'
    printf '%-6s %-5s nofile %s\n' '*' soft "$NEED_NOFILE" '*' hard "$NEED_NOFILE" \
        root soft "$NEED_NOFILE" root hard "$NEED_NOFILE"
}

# Writes one sysctl value: into the fake /proc/sys under --root, with sysctl -w otherwise.
set_sysctl() { # key value
    if ((ROOT_GIVEN)); then
        local path
        path=$(sysctl_path "$1")
        [[ -e $path ]] || return 1
        printf '%s\n' "${2// /$'\t'}" >"$path"
    else
        sysctl -q -w "$1=$2" >/dev/null
    fi
}

save_file_state() { # rel-path name
    local src=$ROOT/$1
    if [[ -e $STATE_DIR/$2.prev || -e $STATE_DIR/$2.absent ]]; then
        return 0 # an earlier apply already saved the original
    fi
    if [[ -e $src ]]; then
        cp -p "$src" "$STATE_DIR/$2.prev"
    else
        : >"$STATE_DIR/$2.absent"
    fi
}

do_apply() {
    STATE_DIR=$ROOT/$STATE_DIR_REL
    if ((!ROOT_GIVEN && !DRY_RUN)) && [[ $EUID -ne 0 ]]; then
        die "$EXIT_FAIL" "apply changes kernel settings: run it as root (sudo), or use --dry-run"
    fi
    compute_plan
    local k changed=0 flag
    printf '# megasock tune apply%s: role=%s connections=%s root=%s\n' \
        "$( ((DRY_RUN)) && printf ' (dry run)')" "$ROLE" "$CONNECTIONS" "${ROOT:-/}"
    printf '%-36s %-28s %-28s %s\n' setting current new change
    for k in "${PLAN_KEYS[@]}"; do
        if [[ ${PLAN_CUR[$k]} == "${PLAN_NEW[$k]}" ]]; then flag=no; else
            flag=yes
            changed=$((changed + 1))
        fi
        printf '%-36s %-28s %-28s %s\n' "$k" "${PLAN_CUR[$k]// /,}" "${PLAN_NEW[$k]// /,}" "$flag"
    done
    local cur_nofile cur_hard="-"
    if cur_nofile=$(read_nofile "$ROOT/proc/self/limits"); then cur_hard=$(field "$cur_nofile" 1); fi
    printf '%-36s %-28s %-28s %s\n' nofile "$cur_hard" "$NEED_NOFILE" limits.d

    local sysctl_file=$ROOT/$SYSCTL_FILE_REL limits_file=$ROOT/$LIMITS_FILE_REL
    if ((DRY_RUN)); then
        printf '# dry run: would change %s settings, write %s and %s, save previous values in %s\n' \
            "$changed" "$sysctl_file" "$limits_file" "$STATE_DIR"
        printf '# dry run: nothing was changed\n'
        return "$EXIT_OK"
    fi

    # Save the previous values first; keep those of an earlier apply (revert goes to the original).
    mkdir -p "$STATE_DIR" || die "$EXIT_FAIL" "cannot create $STATE_DIR"
    local saved=$STATE_DIR/sysctl.saved
    [[ -e $saved ]] || : >"$saved" || die "$EXIT_FAIL" "cannot write $saved"
    for k in "${PLAN_KEYS[@]}"; do
        if ! grep -q -F -x -e "$k" <(cut -f1 "$saved"); then
            printf '%s\t%s\n' "$k" "${PLAN_CUR[$k]}" >>"$saved" || die "$EXIT_FAIL" "cannot write $saved"
        fi
    done
    save_file_state "$SYSCTL_FILE_REL" sysctl.d || die "$EXIT_FAIL" "cannot save $sysctl_file"
    save_file_state "$LIMITS_FILE_REL" limits.d || die "$EXIT_FAIL" "cannot save $limits_file"

    write_file_atomic "$sysctl_file" "$(sysctl_file_content)"$'\n' || die "$EXIT_FAIL" "cannot write $sysctl_file"

    if ((ROOT_GIVEN)); then
        for k in "${PLAN_KEYS[@]}"; do
            set_sysctl "$k" "${PLAN_NEW[$k]}" || die "$EXIT_FAIL" "cannot write $(sysctl_path "$k")"
        done
    else
        command -v sysctl >/dev/null || die "$EXIT_FAIL" "sysctl not found (Debian: apt-get install procps)"
        sysctl -q -e -p "$sysctl_file" >/dev/null || die "$EXIT_FAIL" "sysctl -p $sysctl_file failed"
    fi
    local bad=0 now
    for k in "${PLAN_KEYS[@]}"; do
        now=$(read_sysctl "$k") || now="-"
        if [[ $now != "${PLAN_NEW[$k]}" ]]; then
            printf '%s: %s is %s after apply, expected %s\n' "$PROG" "$k" "$now" "${PLAN_NEW[$k]}" >&2
            bad=1
        fi
    done
    ((bad == 0)) || die "$EXIT_FAIL" "some settings did not take; previous values are saved, run: $0 revert"
    # limits.d last: a nofile above fs.nr_open can make pam_limits refuse logins.
    write_file_atomic "$limits_file" "$(limits_file_content)"$'\n' || die "$EXIT_FAIL" "cannot write $limits_file"

    printf '# applied %s changed settings; wrote %s and %s; previous values saved in %s\n' \
        "$changed" "$sysctl_file" "$limits_file" "$STATE_DIR"
    printf '# nofile: log in again for limits.d to apply; for the systemd unit set LimitNOFILE=%s\n' "$NEED_NOFILE"
    if role_has_server && ((LARGE)); then
        printf '# server: start megasock with --backlog %s to use the larger accept queue\n' "$NEED_BACKLOG"
    fi
    printf '# verify: %s check --connections %s --role %s\n' "$0" "$CONNECTIONS" "$ROLE"
    return "$EXIT_OK"
}

# --- revert -------------------------------------------------------------------------------
# restore_file REL NAME [describe]: put back the file saved by apply (or remove it if apply
# created it); with "describe", only print what that does.
restore_file() {
    local dst=$ROOT/$1 mode=${3:-}
    if [[ -e $STATE_DIR/$2.prev ]]; then
        if [[ $mode == describe ]]; then
            printf '# %s %s
' "$( ((DRY_RUN)) && printf 'dry run: would restore' || printf 'restored')" "$dst"
        else
            cp -p "$STATE_DIR/$2.prev" "$dst"
        fi
    elif [[ -e $STATE_DIR/$2.absent ]]; then
        if [[ $mode == describe ]]; then
            printf '# %s %s
' "$( ((DRY_RUN)) && printf 'dry run: would remove' || printf 'removed')" "$dst"
        else
            rm -f "$dst"
        fi
    fi
}

do_revert() {
    STATE_DIR=$ROOT/$STATE_DIR_REL
    local saved=$STATE_DIR/sysctl.saved
    if [[ ! -e $saved ]]; then
        printf '%s: nothing to revert (no saved state in %s)\n' "$PROG" "$STATE_DIR" >&2
        return "$EXIT_NOTHING"
    fi
    if ((!ROOT_GIVEN && !DRY_RUN)) && [[ $EUID -ne 0 ]]; then
        die "$EXIT_FAIL" "revert changes kernel settings: run it as root (sudo), or use --dry-run"
    fi
    if ((!DRY_RUN)); then
        # Files first: the restored limits.d must never exceed the restored fs.nr_open.
        restore_file "$LIMITS_FILE_REL" limits.d || die "$EXIT_FAIL" "cannot restore $ROOT/$LIMITS_FILE_REL"
        restore_file "$SYSCTL_FILE_REL" sysctl.d || die "$EXIT_FAIL" "cannot restore $ROOT/$SYSCTL_FILE_REL"
    fi
    local k v now bad=0
    printf '# megasock tune revert%s: root=%s\n' "$( ((DRY_RUN)) && printf ' (dry run)')" "${ROOT:-/}"
    printf '%-36s %-28s %s\n' setting current restored
    while IFS=$'\t' read -r k v; do
        [[ -n $k ]] || continue
        now=$(read_sysctl "$k") || now="-"
        printf '%-36s %-28s %s\n' "$k" "${now// /,}" "${v// /,}"
        if ((!DRY_RUN)); then
            if ! set_sysctl "$k" "$v"; then
                printf '%s: cannot restore %s=%s\n' "$PROG" "$k" "$v" >&2
                bad=1
            fi
        fi
    done <"$saved"
    restore_file "$LIMITS_FILE_REL" limits.d describe
    restore_file "$SYSCTL_FILE_REL" sysctl.d describe
    if ((DRY_RUN)); then
        printf '# dry run: nothing was changed\n'
        return "$EXIT_OK"
    fi
    ((bad == 0)) || die "$EXIT_FAIL" "some values were not restored; saved state kept in $STATE_DIR"
    rm -rf "$STATE_DIR"
    printf '# reverted: previous values restored, saved state removed\n'
    return "$EXIT_OK"
}

main() {
    parse_args "$@"
    case $VERB in
        check) do_check ;;
        apply) do_apply ;;
        revert) do_revert ;;
    esac
}

main "$@"
