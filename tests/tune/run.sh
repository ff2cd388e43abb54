#!/usr/bin/env bash
# tests/tune/run.sh: tests for scripts/tune.sh against fake /proc and /etc trees in a temp dir,
# plus shellcheck on every shell script under scripts/ and tests/tune/ and static checks of the
# files in tuning/. Never touches the live /proc/sys or /etc (only a read-only `check`).
# Last line: "tune: N passed, M failed"; exit status 1 if anything failed.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TUNE=$REPO/scripts/tune.sh

# The per-connection figure the script uses (it changes with docs/PERFORMANCE.md); the expected
# estimates below follow it: idle = N * (3907 + 216 + 8 + MB) on a server, busy adds N * buffers.
MB=$(sed -n 's/^MEGASOCK_CONN_BYTES=\([0-9][0-9]*\).*/\1/p' "$TUNE")
KPS=$((3907 + 216 + 8))
gib() { printf '%d.%02d' $(($1 / 1073741824)) $((($1 % 1073741824) * 100 / 1073741824)); }

PASSED=0
FAILED=0
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tune-test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

pass() {
    PASSED=$((PASSED + 1))
    printf 'ok   - %s\n' "$1"
}

fail() {
    FAILED=$((FAILED + 1))
    printf 'FAIL - %s\n' "$1"
    shift
    local line
    for line in "$@"; do
        printf '       %s\n' "$line"
    done
}

# expect NAME ACTUAL EXPECTED
expect() {
    if [[ $2 == "$3" ]]; then pass "$1"; else fail "$1" "expected: '$3'" "actual:   '$2'"; fi
}

# expect_match NAME TEXT REGEX
expect_match() {
    if [[ $2 =~ $3 ]]; then pass "$1"; else fail "$1" "no match for /$3/ in:" "$2"; fi
}

# run_tune ARGS...: runs the script, sets OUT, ERR and RC.
run_tune() {
    local errf=$TMP/stderr
    OUT=$("$TUNE" "$@" 2>"$errf")
    RC=$?
    ERR=$(<"$errf")
}

# expect_rc NAME CODE (of the last run_tune)
expect_rc() {
    if [[ $RC == "$2" ]]; then pass "$1"; else fail "$1" "expected exit $2, got $RC" "stdout: $OUT" "stderr: $ERR"; fi
}

# --- fake trees ---------------------------------------------------------------------------
set_val() { # dir key value (fields separated by spaces; written tab-separated like the kernel)
    local path=$1/proc/sys/${2//.//}
    mkdir -p "$(dirname "$path")"
    printf '%s\n' "${3// /$'\t'}" >"$path"
}

get_val() { # dir key -> value with single spaces
    local path=$1/proc/sys/${2//.//} raw
    local -a f
    raw=$(<"$path") || return 1
    read -r -a f <<<"$raw"
    printf '%s' "${f[*]}"
}

write_limits() { # file soft hard
    mkdir -p "$(dirname "$1")"
    {
        printf '%-26s%-21s%-21s%-10s\n' Limit 'Soft Limit' 'Hard Limit' Units
        printf '%-26s%-21s%-21s%-10s\n' 'Max cpu time' unlimited unlimited seconds
        printf '%-26s%-21s%-21s%-10s\n' 'Max processes' 96551 96551 processes
        printf '%-26s%-21s%-21s%-10s\n' 'Max open files' "$2" "$3" files
        printf '%-26s%-21s%-21s%-10s\n' 'Max locked memory' 8388608 8388608 bytes
    } >"$1"
}

write_meminfo() { # dir kB
    mkdir -p "$1/proc"
    printf 'MemTotal:       %s kB\nMemFree:        1000 kB\n' "$2" >"$1/proc/meminfo"
}

# A box with stock-like defaults, all below what 1M connections need.
make_stock() { # dir
    local d=$1
    mkdir -p "$d"
    set_val "$d" fs.file-max 1000000
    set_val "$d" fs.nr_open 1048576
    set_val "$d" fs.epoll.max_user_watches 500000
    set_val "$d" net.core.somaxconn 4096
    set_val "$d" net.ipv4.tcp_max_syn_backlog 2048
    set_val "$d" net.core.netdev_max_backlog 1000
    set_val "$d" net.ipv4.tcp_rmem "4096 131072 6291456"
    set_val "$d" net.ipv4.tcp_wmem "4096 16384 4194304"
    set_val "$d" net.ipv4.tcp_mem "288459 384612 576918"
    set_val "$d" net.netfilter.nf_conntrack_max 262144
    set_val "$d" net.ipv4.ip_local_port_range "32768 60999"
    set_val "$d" net.ipv4.tcp_tw_reuse 2
    write_limits "$d/proc/self/limits" 1024 524288
    write_meminfo "$d" 24731708
}

# A box already tuned for 1M (server and load generator), with generous limits.
make_tuned() { # dir
    local d=$1
    make_stock "$d"
    set_val "$d" fs.file-max 9999999
    set_val "$d" fs.nr_open 2000000
    set_val "$d" fs.epoll.max_user_watches 5000000
    set_val "$d" net.core.somaxconn 65535
    set_val "$d" net.ipv4.tcp_max_syn_backlog 65535
    set_val "$d" net.core.netdev_max_backlog 16384
    set_val "$d" net.ipv4.tcp_rmem "4096 16384 6291456"
    set_val "$d" net.ipv4.tcp_mem "1000000 2000000 3000000"
    set_val "$d" net.netfilter.nf_conntrack_max 2000000
    set_val "$d" net.ipv4.ip_local_port_range "10000 65535"
    set_val "$d" net.ipv4.tcp_tw_reuse 1
    write_limits "$d/proc/self/limits" 2000000 2000000
    write_meminfo "$d" 67108864
}

snapshot() { # dir -> listing and checksums of every file and directory
    (cd "$1" && find . -print | LC_ALL=C sort && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum)
}

file_snapshot() { # dir -> checksums of every file (directories apply created may stay)
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum)
}

row() { # "field" of table row named $2 in text $1: field 2=current 3=needed/new 4=ok/change
    awk -v k="$2" -v f="$3" '$1 == k { print $f; exit }' <<<"$1"
}

conf_val() { # file key -> value of "key = value" (or "-key = value")
    awk -v k="$2" '
        /^[[:space:]]*[#;]/ { next }
        { line = $0; sub(/^-/, "", line) }
        index(line, "=") {
            key = substr(line, 1, index(line, "=") - 1); gsub(/[[:space:]]/, "", key)
            if (key == k) { v = substr(line, index(line, "=") + 1); gsub(/^[[:space:]]+|[[:space:]]+$/, "", v); gsub(/[[:space:]]+/, " ", v); print v; exit }
        }' "$1"
}

conf_keys() { # file -> active keys, sorted
    awk '/^[[:space:]]*[#;]/ || !/=/ { next } { l = $0; sub(/^-/, "", l); k = substr(l, 1, index(l, "=") - 1); gsub(/[[:space:]]/, "", k); print k }' "$1" |
        LC_ALL=C sort
}

# === shellcheck =============================================================================
test_shellcheck() {
    if ! command -v shellcheck >/dev/null 2>&1; then
        fail "shellcheck is installed" "shellcheck not found: install it with 'apt-get install shellcheck'"
        return
    fi
    local f files=()
    while IFS= read -r -d '' f; do
        if [[ $f == *.sh ]] || head -n1 "$f" | grep -qE '^#!.*\b(ba|da|k)?sh\b'; then
            files+=("$f")
        fi
    done < <(find "$REPO/scripts" "$REPO/tests/tune" -type f -print0 | LC_ALL=C sort -z)
    if [[ ${#files[@]} -lt 2 ]]; then
        fail "shell scripts found for shellcheck" "found: ${files[*]}"
        return
    fi
    for f in "${files[@]}"; do
        local out
        if out=$(shellcheck -x "$f" 2>&1); then
            pass "shellcheck ${f#"$REPO"/}"
        else
            fail "shellcheck ${f#"$REPO"/}" "$out"
        fi
    done
}

# === usage and exit codes =====================================================================
test_usage() {
    local d=$TMP/usage
    make_stock "$d"
    run_tune --help
    expect_rc "--help exits 0" 0
    expect_match "--help documents exit codes" "$OUT" "Exit codes:.*0 .*1 .*2 .*3 .*4 "
    expect_match "--help documents the memory formula" "$OUT" "idle = N_server \\* \\(3907 \\+ 216 \\+ 8 \\+ MEGASOCK_CONN_BYTES=$MB\\)"
    run_tune
    expect_rc "no verb -> 2" 2
    run_tune frobnicate
    expect_rc "unknown verb -> 2" 2
    run_tune check --root "$d"
    expect_rc "check without --connections -> 2" 2
    run_tune apply --root "$d"
    expect_rc "apply without --connections -> 2" 2
    local bad
    for bad in 0 -5 abc 1e6 1000000000 007; do
        run_tune check --root "$d" --connections "$bad"
        expect_rc "--connections $bad -> 2" 2
    done
    run_tune check --root "$d" --connections 10 --role client
    expect_rc "--role client -> 2" 2
    run_tune check --root "$TMP/does-not-exist" --connections 10
    expect_rc "--root missing dir -> 2" 2
    run_tune check --root "$d" --connections 10 --bogus
    expect_rc "unknown option -> 2" 2
    run_tune check --root "$d" --connections
    expect_rc "option without value -> 2" 2
    run_tune revert --root "$d" --connections 10
    expect_rc "revert --connections -> 2" 2
    run_tune check --root "$d" --connections 10 --dry-run
    expect_rc "check --dry-run -> 2" 2
    run_tune apply --root "$d" --connections 10 --pid 1
    expect_rc "apply --pid -> 2" 2
    run_tune check --root "$d" --connections 10 --pid abc
    expect_rc "--pid abc -> 2" 2
    run_tune check "--root=$d/" --connections=1000
    expect_rc "--opt=value forms and trailing slash accepted" 0
}

# === check ====================================================================================
test_check_stock() {
    local d=$TMP/check-stock
    make_stock "$d"
    run_tune check --root "$d" --connections 1000000
    expect_rc "check 1M on stock box -> 1" 1
    expect "check: header" "$(grep -v '^#' <<<"$OUT" | head -n1 | tr -s ' ')" "setting current needed ok"
    local bad_rows
    bad_rows=$(grep -v '^#' <<<"$OUT" | awk 'NF != 4')
    expect "check: every table row has 4 fields" "$bad_rows" ""
    expect "check: nr_open current" "$(row "$OUT" fs.nr_open 2)" 1048576
    expect "check: nr_open needed" "$(row "$OUT" fs.nr_open 3)" ">=1101024"
    expect "check: nr_open short" "$(row "$OUT" fs.nr_open 4)" no
    expect "check: file-max needed 2x fds" "$(row "$OUT" fs.file-max 3)" ">=2202048"
    expect "check: epoll watches needed" "$(row "$OUT" fs.epoll.max_user_watches 3)" ">=1101024"
    expect "check: nofile.hard read from limits" "$(row "$OUT" nofile.hard 2)" 524288
    expect "check: nofile.hard short" "$(row "$OUT" nofile.hard 4)" no
    expect "check: server soft nofile not required" "$(row "$OUT" nofile.soft 4)" n/a
    expect "check: somaxconn" "$(row "$OUT" net.core.somaxconn 3) $(row "$OUT" net.core.somaxconn 4)" ">=65535 no"
    expect "check: syn backlog" "$(row "$OUT" net.ipv4.tcp_max_syn_backlog 4)" no
    expect "check: netdev backlog" "$(row "$OUT" net.core.netdev_max_backlog 3)" ">=16384"
    expect "check: rmem default too big" "$(row "$OUT" 'net.ipv4.tcp_rmem[default]' 2) $(row "$OUT" 'net.ipv4.tcp_rmem[default]' 4)" "131072 no"
    expect "check: rmem min ok" "$(row "$OUT" 'net.ipv4.tcp_rmem[min]' 4)" yes
    expect "check: wmem default ok" "$(row "$OUT" 'net.ipv4.tcp_wmem[default]' 4)" yes
    expect "check: tcp_mem pressure" "$(row "$OUT" 'net.ipv4.tcp_mem[pressure]' 2) $(row "$OUT" 'net.ipv4.tcp_mem[pressure]' 3)" "384612 >=2000000"
    expect "check: tcp_mem max" "$(row "$OUT" 'net.ipv4.tcp_mem[max]' 3)" ">=3000000"
    expect "check: conntrack" "$(row "$OUT" net.netfilter.nf_conntrack_max 3) $(row "$OUT" net.netfilter.nf_conntrack_max 4)" ">=2000000 no"
    expect "check: server has no port-range row" "$(row "$OUT" 'net.ipv4.ip_local_port_range[low]' 1)" ""
    expect "check: memory total from meminfo" "$(row "$OUT" memory.total 2)" $((24731708 * 1024))
    local idle=$((1000000 * (KPS + MB))) busy
    busy=$((idle + 1000000 * 8192))
    expect "check: memory busy needed" "$(row "$OUT" memory.total 3)" ">=$busy"
    expect_match "check: idle/busy estimate" "$OUT" "idle_bytes=$idle idle_gib=$(gib "$idle") busy_bytes=$busy busy_gib=$(gib "$busy")"
    expect_match "check: per-socket figures" "$OUT" "kernel_per_socket=4131 megasock_per_conn=$MB buffers_per_socket=8192"
    expect_match "check: result names the fix" "$OUT" "# result: 11 of 15 settings fall short; fix: sudo .*tune.sh apply --connections 1000000 --role server"
    local before after
    before=$(snapshot "$d")
    after=$(snapshot "$d")
    expect "check changes nothing" "$after" "$before"

    run_tune check --root "$d" --connections 1000
    expect_rc "check 1000 on stock box -> 0" 0
    expect "check small N: rmem default not required" "$(row "$OUT" 'net.ipv4.tcp_rmem[default]' 4)" n/a
    expect "check small N: somaxconn 4096 enough" "$(row "$OUT" net.core.somaxconn 3)" ">=4096"
    expect_match "check small N: result ok" "$OUT" "# result: ok"
}

test_check_tuned() {
    local d=$TMP/check-tuned
    make_tuned "$d"
    run_tune check --root "$d" --connections 1000000
    expect_rc "check 1M on tuned box -> 0" 0
    run_tune check --root "$d" --connections 1000000 --role loadgen
    expect_rc "check loadgen 1M on tuned box -> 0" 0
    run_tune check --root "$d" --connections 2000000
    expect_rc "check 2M on box tuned for 1M -> 1" 1

    # A tuned box without conntrack: the row is n/a and not counted.
    rm "$d/proc/sys/net/netfilter/nf_conntrack_max"
    run_tune check --root "$d" --connections 1000000
    expect_rc "check without conntrack module -> 0" 0
    expect "check: absent conntrack is n/a" "$(row "$OUT" net.netfilter.nf_conntrack_max 2) $(row "$OUT" net.netfilter.nf_conntrack_max 4)" "- n/a"

    # Too little RAM for the busy estimate.
    write_meminfo "$d" 8000000
    run_tune check --root "$d" --connections 1000000
    expect_rc "check 1M on an 8 GB box -> 1" 1
    expect "check: memory row short" "$(row "$OUT" memory.total 4)" no
    write_meminfo "$d" 67108864

    # Larger buffer minimums change the estimate and fail the min rows.
    set_val "$d" net.ipv4.tcp_rmem "8192 16384 6291456"
    run_tune check --root "$d" --connections 1000000
    expect_rc "check with rmem min 8192 -> 1" 1
    expect "check: rmem min row short" "$(row "$OUT" 'net.ipv4.tcp_rmem[min]' 4)" no
    expect_match "check: busy uses the live minimums" "$OUT" "busy_bytes=$((1000000 * (KPS + MB + 8192 + 4096))) "
    expect "check: tcp_mem need uses live minimums" "$(row "$OUT" 'net.ipv4.tcp_mem[pressure]' 3)" ">=3000000"

    # A missing required key is reported as short, not as a crash.
    rm "$d/proc/sys/fs/nr_open"
    run_tune check --root "$d" --connections 1000
    expect_rc "check with a missing key -> 1" 1
    expect "check: missing key row" "$(row "$OUT" fs.nr_open 2) $(row "$OUT" fs.nr_open 4)" "- no"
}

test_check_pid_and_roles() {
    local d=$TMP/check-pid
    make_tuned "$d"
    write_limits "$d/proc/4242/limits" 20000 2000000
    run_tune check --root "$d" --connections 1000000 --pid 4242
    expect_rc "check --pid with low soft limit -> 1" 1
    expect "check --pid: soft limit read" "$(row "$OUT" nofile.soft 2) $(row "$OUT" nofile.soft 4)" "20000 no"
    expect_match "check --pid: header names the pid" "$OUT" "limits=pid_4242"
    write_limits "$d/proc/4242/limits" 1500000 1500000
    run_tune check --root "$d" --connections 1000000 --pid 4242
    expect_rc "check --pid with enough -> 0" 0
    run_tune check --root "$d" --connections 1000000 --pid 999
    expect_rc "check --pid of a missing process -> 3" 3

    local s=$TMP/check-roles
    make_stock "$s"
    write_limits "$s/proc/self/limits" 1024 2000000
    run_tune check --root "$s" --connections 1000000 --role loadgen
    expect_rc "check loadgen on stock -> 1" 1
    expect "loadgen: no somaxconn row" "$(row "$OUT" net.core.somaxconn 1)" ""
    expect "loadgen: soft nofile required" "$(row "$OUT" nofile.soft 4)" no
    expect "loadgen: hard nofile ok" "$(row "$OUT" nofile.hard 4)" yes
    expect "loadgen: port range low" "$(row "$OUT" 'net.ipv4.ip_local_port_range[low]' 2) $(row "$OUT" 'net.ipv4.ip_local_port_range[low]' 3) $(row "$OUT" 'net.ipv4.ip_local_port_range[low]' 4)" "32768 <=10000 no"
    expect "loadgen: port range high" "$(row "$OUT" 'net.ipv4.ip_local_port_range[high]' 3)" ">=65535"
    expect "loadgen: tw_reuse" "$(row "$OUT" net.ipv4.tcp_tw_reuse 2) $(row "$OUT" net.ipv4.tcp_tw_reuse 3) $(row "$OUT" net.ipv4.tcp_tw_reuse 4)" "2 =1 no"
    expect_match "loadgen: source addresses needed" "$OUT" "need at least 36 source addresses \\(28232 ports each\\)"
    expect_match "loadgen: no megasock bytes in idle estimate" "$OUT" "idle_bytes=4131000000 "

    run_tune check --root "$s" --connections 1000000 --role both
    expect "both: somaxconn row" "$(row "$OUT" net.core.somaxconn 3)" ">=65535"
    expect "both: port range row" "$(row "$OUT" 'net.ipv4.ip_local_port_range[high]' 3)" ">=65535"
    expect "both: file-max covers 2N sockets" "$(row "$OUT" fs.file-max 3)" ">=4402048"
    expect "both: tcp_mem covers 2N sockets" "$(row "$OUT" 'net.ipv4.tcp_mem[pressure]' 3)" ">=4000000"
    expect_match "both: estimate" "$OUT" "idle_bytes=$((1000000 * (2 * KPS + MB))) idle_gib=[0-9.]+ busy_bytes=$((1000000 * (2 * KPS + MB) + 2000000 * 8192)) "
}

test_check_live() {
    # Read-only run on the live system: must parse it (exit 0 or 1, never 2 or 3).
    run_tune check --connections 100
    if [[ $RC == 0 || $RC == 1 ]] && [[ $OUT == *"setting "*"current"*"needed"* ]]; then
        pass "check on the live system (read-only) parses it"
    else
        fail "check on the live system (read-only) parses it" "rc=$RC" "$OUT" "$ERR"
    fi
}

# === apply ====================================================================================
test_apply_dry_run() {
    local d=$TMP/dry
    make_stock "$d"
    local before after
    before=$(snapshot "$d")
    run_tune apply --root "$d" --connections 1000000 --dry-run
    expect_rc "apply --dry-run -> 0" 0
    after=$(snapshot "$d")
    expect "apply --dry-run changes nothing" "$after" "$before"
    expect "dry run: nr_open new" "$(row "$OUT" fs.nr_open 3) $(row "$OUT" fs.nr_open 4)" "1101024 yes"
    expect "dry run: tcp_mem new" "$(row "$OUT" net.ipv4.tcp_mem 3)" "1000000,2000000,3000000"
    expect "dry run: unchanged key" "$(row "$OUT" net.ipv4.tcp_wmem 4)" no
    expect_match "dry run: says so" "$OUT" "dry run: nothing was changed"

    run_tune revert --root "$d" --dry-run
    expect_rc "revert --dry-run with nothing saved -> 4" 4
}

test_apply_server() {
    local d=$TMP/apply
    make_stock "$d"
    run_tune apply --root "$d" --connections 1000000
    expect_rc "apply 1M server -> 0" 0
    expect "apply: file-max" "$(get_val "$d" fs.file-max)" 2202048
    expect "apply: nr_open" "$(get_val "$d" fs.nr_open)" 1101024
    expect "apply: epoll watches" "$(get_val "$d" fs.epoll.max_user_watches)" 1101024
    expect "apply: somaxconn" "$(get_val "$d" net.core.somaxconn)" 65535
    expect "apply: syn backlog" "$(get_val "$d" net.ipv4.tcp_max_syn_backlog)" 65535
    expect "apply: netdev backlog" "$(get_val "$d" net.core.netdev_max_backlog)" 16384
    expect "apply: tcp_rmem" "$(get_val "$d" net.ipv4.tcp_rmem)" "4096 16384 6291456"
    expect "apply: tcp_wmem" "$(get_val "$d" net.ipv4.tcp_wmem)" "4096 16384 4194304"
    expect "apply: tcp_mem" "$(get_val "$d" net.ipv4.tcp_mem)" "1000000 2000000 3000000"
    expect "apply: conntrack" "$(get_val "$d" net.netfilter.nf_conntrack_max)" 2000000
    expect "apply server: port range untouched" "$(get_val "$d" net.ipv4.ip_local_port_range)" "32768 60999"
    expect "apply server: tw_reuse untouched" "$(get_val "$d" net.ipv4.tcp_tw_reuse)" 2
    expect_match "apply: tab-separated like the kernel" "$(<"$d/proc/sys/net/ipv4/tcp_mem")" $'^1000000\t2000000\t3000000$'

    local f=$d/etc/sysctl.d/99-megasock.conf
    if [[ -f $f ]]; then pass "apply writes etc/sysctl.d/99-megasock.conf"; else fail "apply writes etc/sysctl.d/99-megasock.conf"; fi
    expect "sysctl.d: nr_open" "$(conf_val "$f" fs.nr_open)" 1101024
    expect "sysctl.d: tcp_mem" "$(conf_val "$f" net.ipv4.tcp_mem)" "1000000 2000000 3000000"
    expect "sysctl.d: tcp_rmem" "$(conf_val "$f" net.ipv4.tcp_rmem)" "4096 16384 6291456"
    expect_match "sysctl.d: conntrack line may fail at boot" "$(<"$f")" $'\n-net.netfilter.nf_conntrack_max = 2000000(\n|$)'
    expect "sysctl.d: every key has a comment" "$(awk '/^-?[a-z]/ && prev !~ /^#/ { print } { prev = $0 }' "$f")" ""
    local l=$d/etc/security/limits.d/99-megasock.conf
    expect "limits.d: nofile lines" "$(awk '!/^#/ && NF == 4 { print $1, $2, $3, $4 }' "$l" | tr '\n' ';')" \
        "* soft nofile 1101024;* hard nofile 1101024;root soft nofile 1101024;root hard nofile 1101024;"
    local saved=$d/var/lib/megasock-tune/sysctl.saved
    expect "state: saved previous nr_open" "$(awk -F'\t' '$1 == "fs.nr_open" { print $2 }' "$saved")" 1048576
    expect "state: saved previous tcp_mem" "$(awk -F'\t' '$1 == "net.ipv4.tcp_mem" { print $2 }' "$saved")" "288459 384612 576918"

    # Now the box passes check (given enough nofile in the shell).
    write_limits "$d/proc/self/limits" 1101024 1101024
    run_tune check --root "$d" --connections 1000000
    expect_rc "check after apply -> 0" 0

    # Applying again changes nothing and keeps the original saved values.
    local first
    first=$(snapshot "$d")
    run_tune apply --root "$d" --connections 1000000
    expect_rc "second apply -> 0" 0
    expect "second apply is idempotent" "$(snapshot "$d")" "$first"
    expect_match "second apply reports 0 changes" "$OUT" "applied 0 changed settings"

    run_tune revert --root "$d"
    expect_rc "revert -> 0" 0
    expect "revert: nr_open" "$(get_val "$d" fs.nr_open)" 1048576
    expect "revert: tcp_mem" "$(get_val "$d" net.ipv4.tcp_mem)" "288459 384612 576918"
    expect "revert: tcp_rmem" "$(get_val "$d" net.ipv4.tcp_rmem)" "4096 131072 6291456"
    expect "revert: somaxconn" "$(get_val "$d" net.core.somaxconn)" 4096
    expect "revert: conntrack" "$(get_val "$d" net.netfilter.nf_conntrack_max)" 262144
    if [[ ! -e $f && ! -e $l ]]; then pass "revert removes the files apply created"; else fail "revert removes the files apply created"; fi
    if [[ ! -e $d/var/lib/megasock-tune ]]; then pass "revert forgets the saved state"; else fail "revert forgets the saved state"; fi
    run_tune revert --root "$d"
    expect_rc "second revert -> 4" 4
}

test_apply_never_lowers() {
    local d=$TMP/big
    make_stock "$d"
    set_val "$d" fs.file-max 9999999
    set_val "$d" fs.epoll.max_user_watches 5502130
    set_val "$d" net.core.somaxconn 100000
    set_val "$d" net.ipv4.tcp_rmem "1024 4096 33554432"
    set_val "$d" net.ipv4.tcp_mem "3000000 5000000 7000000"
    set_val "$d" net.ipv4.ip_local_port_range "1024 65535"
    run_tune apply --root "$d" --connections 1000000 --role both
    expect_rc "apply on a big box -> 0" 0
    expect "never lowers file-max" "$(get_val "$d" fs.file-max)" 9999999
    expect "never lowers epoll watches" "$(get_val "$d" fs.epoll.max_user_watches)" 5502130
    expect "never lowers somaxconn" "$(get_val "$d" net.core.somaxconn)" 100000
    expect "keeps smaller rmem min/default and bigger max" "$(get_val "$d" net.ipv4.tcp_rmem)" "1024 4096 33554432"
    # tcp_mem for 2M sockets with 1024+4096 minimums: ceil(2e6 * 5120 / 4096) = 2500000 pages.
    expect "tcp_mem: raises only the elements below need" "$(get_val "$d" net.ipv4.tcp_mem)" "3000000 5000000 7000000"
    expect "keeps a wider port range" "$(get_val "$d" net.ipv4.ip_local_port_range)" "1024 65535"
    expect "both: tw_reuse" "$(get_val "$d" net.ipv4.tcp_tw_reuse)" 1
    expect "both: file in sysctl.d has loadgen keys" "$(conf_val "$d/etc/sysctl.d/99-megasock.conf" net.ipv4.tcp_tw_reuse)" 1

    local s=$TMP/small
    make_stock "$s"
    run_tune apply --root "$s" --connections 1000
    expect_rc "apply 1000 -> 0" 0
    expect "small N: rmem default kept" "$(get_val "$s" net.ipv4.tcp_rmem)" "4096 131072 6291456"
    expect "small N: syn backlog kept" "$(get_val "$s" net.ipv4.tcp_max_syn_backlog)" 2048
    expect "small N: somaxconn kept" "$(get_val "$s" net.core.somaxconn)" 4096
    expect "small N: nr_open kept" "$(get_val "$s" fs.nr_open)" 1048576
}

test_apply_revert_roles() {
    local d=$TMP/roles
    make_stock "$d"
    mkdir -p "$d/etc/sysctl.d"
    printf '# an older file the operator had\nnet.core.somaxconn = 8192\n' >"$d/etc/sysctl.d/99-megasock.conf"
    local original
    original=$(file_snapshot "$d")
    run_tune apply --root "$d" --connections 500000 --role server
    expect_rc "apply server 500k -> 0" 0
    run_tune apply --root "$d" --connections 500000 --role loadgen
    expect_rc "then apply loadgen 500k -> 0" 0
    expect "loadgen: port range" "$(get_val "$d" net.ipv4.ip_local_port_range)" "10000 65535"
    expect "loadgen: tw_reuse" "$(get_val "$d" net.ipv4.tcp_tw_reuse)" 1
    expect "loadgen keeps server values already raised" "$(get_val "$d" net.core.somaxconn)" 65535
    expect "loadgen: nofile for 500k" "$(get_val "$d" fs.nr_open)" 1048576
    expect "state: loadgen keys saved from before any apply" \
        "$(awk -F'\t' '$1 == "net.ipv4.ip_local_port_range" { print $2 }' "$d/var/lib/megasock-tune/sysctl.saved")" "32768 60999"

    local before_dry
    before_dry=$(snapshot "$d")
    run_tune revert --root "$d" --dry-run
    expect_rc "revert --dry-run -> 0" 0
    expect "revert --dry-run changes nothing" "$(snapshot "$d")" "$before_dry"
    expect "revert --dry-run lists restored values" "$(row "$OUT" net.ipv4.tcp_tw_reuse 3)" 2
    expect_match "revert --dry-run names the restored file" "$OUT" "would restore .*/etc/sysctl.d/99-megasock.conf"

    run_tune revert --root "$d"
    expect_rc "revert after two applies -> 0" 0
    expect "revert restores every file to the original" "$(file_snapshot "$d")" "$original"
}

test_apply_failures() {
    local d=$TMP/fail
    make_stock "$d"
    rm "$d/proc/sys/fs/epoll/max_user_watches"
    local before
    before=$(snapshot "$d")
    run_tune apply --root "$d" --connections 1000000
    expect_rc "apply with a missing required key -> 3" 3
    expect_match "apply failure names the key" "$ERR" "fs.epoll.max_user_watches"
    expect "failed apply changes nothing" "$(snapshot "$d")" "$before"

    local c=$TMP/noconntrack
    make_stock "$c"
    rm "$c/proc/sys/net/netfilter/nf_conntrack_max"
    run_tune apply --root "$c" --connections 1000000
    expect_rc "apply without conntrack module -> 0" 0
    expect "no conntrack line when the module is absent" "$(conf_val "$c/etc/sysctl.d/99-megasock.conf" net.netfilter.nf_conntrack_max)" ""
    if [[ ! -e $c/proc/sys/net/netfilter/nf_conntrack_max ]]; then pass "apply does not invent sysctl files"; else fail "apply does not invent sysctl files"; fi

    local g=$TMP/garbage
    make_stock "$g"
    set_val "$g" net.core.somaxconn "lots"
    before=$(snapshot "$g")
    run_tune apply --root "$g" --connections 1000000
    expect_rc "apply with a non-numeric value -> 3" 3
    expect "failed apply (bad value) changes nothing" "$(snapshot "$g")" "$before"
}

# === static files in tuning/ =================================================================
test_static_files() {
    local s=$REPO/tuning/sysctl.d/99-megasock.conf l=$REPO/tuning/limits.d/99-megasock.conf
    local u=$REPO/tuning/megasock.service d=$TMP/static k
    for k in "$s" "$l" "$u"; do
        if [[ -f $k ]]; then pass "exists: ${k#"$REPO"/}"; else fail "exists: ${k#"$REPO"/}"; fi
    done
    make_stock "$d"
    run_tune apply --root "$d" --connections 1000000 --role server
    local gen=$d/etc/sysctl.d/99-megasock.conf
    expect "static sysctl.d has the keys apply writes for 1M" "$(conf_keys "$s")" "$(conf_keys "$gen")"
    for k in $(conf_keys "$gen"); do
        expect "static sysctl.d $k = apply's value for 1M" "$(conf_val "$s" "$k")" "$(conf_val "$gen" "$k")"
    done
    expect "static sysctl.d: every setting has a comment above" "$(awk '/^-?[a-z]/ && prev !~ /^#/ { print } { prev = $0 }' "$s")" ""
    local g=$TMP/static-lg
    make_stock "$g"
    run_tune apply --root "$g" --connections 1000000 --role loadgen
    for k in net.ipv4.ip_local_port_range net.ipv4.tcp_tw_reuse; do
        expect "static sysctl.d (commented) $k = loadgen value" \
            "$(sed -n "s/^# $k = //p" "$s")" "$(conf_val "$g/etc/sysctl.d/99-megasock.conf" "$k")"
    done
    expect "static limits.d = apply's limits.d" \
        "$(grep -v '^#' "$l" | tr -s ' ')" "$(grep -v '^#' "$d/etc/security/limits.d/99-megasock.conf" | tr -s ' ')"

    local unit
    unit=$(<"$u")
    expect_match "unit: ExecStart" "$unit" $'\nExecStart=[^\n]*/megasock serve --config /etc/megasock/megasock.toml\n'
    expect_match "unit: LimitNOFILE for 1M" "$unit" $'\nLimitNOFILE=1101024\n'
    expect_match "unit: Restart=on-failure" "$unit" $'\nRestart=on-failure\n'
    expect_match "unit: KillSignal=SIGTERM" "$unit" $'\nKillSignal=SIGTERM\n'
    local stop
    stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' "$u")
    if [[ $stop =~ ^[0-9]+$ ]] && ((stop > 10)); then
        pass "unit: TimeoutStopSec ($stop s) exceeds the 10 s drain timeout"
    else
        fail "unit: TimeoutStopSec exceeds the 10 s drain timeout" "TimeoutStopSec='$stop'"
    fi
    for k in NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes; do
        expect_match "unit: $k" "$unit" $'\n'"$k"$'\n'
    done
    if [[ $unit == *$'\nProcSubset=pid'* || $unit == *$'\nPrivateNetwork=yes'* || $unit == *$'\nIPAddressDeny=any'* ]]; then
        fail "unit: no option that breaks a network server or hides /proc/sys"
    else
        pass "unit: no option that breaks a network server or hides /proc/sys"
    fi
    if command -v systemd-analyze >/dev/null 2>&1; then
        local copy=$TMP/megasock.service out
        sed 's#^ExecStart=[^ ]*#ExecStart=/bin/true#' "$u" >"$copy"
        if out=$(systemd-analyze verify "$copy" 2>&1) && [[ -z $out ]]; then
            pass "unit: systemd-analyze verify"
        else
            fail "unit: systemd-analyze verify" "$out"
        fi
    else
        printf 'note - systemd-analyze not installed: unit not verified by systemd\n'
    fi
}

test_shellcheck
test_usage
test_check_stock
test_check_tuned
test_check_pid_and_roles
test_check_live
test_apply_dry_run
test_apply_server
test_apply_never_lowers
test_apply_revert_roles
test_apply_failures
test_static_files

printf 'tune: %d passed, %d failed\n' "$PASSED" "$FAILED"
((FAILED == 0))
