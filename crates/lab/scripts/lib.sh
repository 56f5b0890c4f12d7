# Helpers for lab scripts, at every level.

# A line on the console, tagged with this level.
say() { echo "LAB-L$LEVEL: $*"; }

# check NAME COMMAND...: runs the command and reports PASS or FAIL for NAME
# (and returns 0 or 1). The test on the host expects every check it names
# to PASS.
check() {
    name=$1
    shift
    if "$@" >/dev/null 2>&1; then
        echo "LAB-CHECK PASS $name"
        return 0
    fi
    echo "LAB-CHECK FAIL $name"
    return 1
}

# require NAME COMMAND...: a check that what follows depends on. If it
# fails, this level stops here: the checks after it are reported as not run
# (by the test on the host) instead of each waiting out its timeout.
require() {
    check "$@" && return 0
    echo "LAB-STOP L$LEVEL after $1"
    say "stopping early: $1 failed, and the checks after it depend on it"
    sync
    poweroff -f
    # poweroff -f does not return; never carry on past a failed requirement.
    while :; do sleep 60; done
}

# frozen PID: process PID is stopped (SIGSTOP took effect).
frozen() { [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" = T ]; }

# freeze PID: stops process PID and returns once it is stopped, so what is
# then observed of it stays true until the next step acts on it.
freeze() {
    kill -STOP "$1"
    n=0
    until frozen "$1" || [ $n -ge 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    frozen "$1"
}

# load_kvm NESTED: loads KVM for AMD with nested=NESTED.
load_kvm() {
    mods=/lib/modules/$(uname -r)
    for m in irqbypass kvm ccp; do
        insmod "$mods/$m.ko" || say "insmod $m failed"
    done
    if insmod "$mods/kvm-amd.ko" "nested=$1" 2>/tmp/kvm-amd.err; then
        say "kvm-amd loaded nested=$(cat /sys/module/kvm_amd/parameters/nested)"
        # Where the modules' code is, for reading a lab watchdog's
        # register dump (L1 boots without KASLR).
        [ "$(arg level)" = 1 ] && say "kvm .text $(cat /sys/module/kvm/sections/.text) kvm_amd .text $(cat /sys/module/kvm_amd/sections/.text)"
    else
        say "kvm-amd refused to load: $(cat /tmp/kvm-amd.err)"
    fi
}

# vm NAME TIMEOUT ARGS...: runs `nestvm run ARGS` with a timeout; its console
# goes to this console and to /tmp/NAME.log; its exit code to /tmp/NAME.rc.
vm() {
    name=$1
    secs=$2
    shift 2
    say "starting $name: nestvm run $*"
    ( timeout "$secs" /nestvm/nestvm run "$@" </dev/null; echo $? >"/tmp/$name.rc" ) 2>&1 | tee "/tmp/$name.log"
    say "$name exited with $(cat "/tmp/$name.rc")"
}

# vm_quiet NAME TIMEOUT ARGS...: like vm, but the console goes to
# /tmp/NAME.log only. A guest's output echoed on this level's console takes
# this level's vCPU out to the VMM above for every character; a level whose
# VMM above acts on its vCPUs while they run a guest (state round trips,
# saves) keeps its console quiet so they rarely stand there.
vm_quiet() {
    name=$1
    secs=$2
    shift 2
    say "starting $name (console to /tmp/$name.log): nestvm run $*"
    timeout "$secs" /nestvm/nestvm run "$@" </dev/null >"/tmp/$name.log" 2>&1
    echo $? >"/tmp/$name.rc"
    say "$name exited with $(cat "/tmp/$name.rc")"
}

# rc_is NAME CODE: the exit code of vm NAME was CODE.
rc_is() { [ "$(cat "/tmp/$1.rc")" = "$2" ]; }

# logged NAME PATTERN: vm NAME's console showed PATTERN.
logged() { grep -q "$2" "/tmp/$1.log"; }

# value NAME KEY: the value of "KEY=value" that vm NAME's console showed last.
value() { sed -n "s/.*$2=\([0-9A-Za-z_.-]*\).*/\1/p" "/tmp/$1.log" | tail -n 1; }

# between LOW HIGH VALUE: LOW <= VALUE <= HIGH (integers).
between() { [ -n "$3" ] && [ "$3" -ge "$1" ] && [ "$3" -le "$2" ]; }

# vm_typed NAME TIMEOUT INPUT ARGS...: like vm, but once the guest's console
# shows "shell ready", types the lines of file INPUT into nestvm's stdin
# (the guest's console is open by then; its tty holds what comes early, and
# nestvm holds input while the UART's FIFO is full).
vm_typed() {
    name=$1
    secs=$2
    input=$3
    shift 3
    : >"/tmp/$name.log"
    say "starting $name: nestvm run $*"
    (
        n=0
        until grep -q "shell ready" "/tmp/$name.log" || [ $n -ge "$secs" ]; do
            sleep 1
            n=$((n + 1))
        done
        cat "$input"
    ) | ( timeout "$secs" /nestvm/nestvm run "$@"; echo $? >"/tmp/$name.rc" ) 2>&1 | tee "/tmp/$name.log"
    say "$name exited with $(cat "/tmp/$name.rc")"
}

# wait_for FILE PATTERN SECS: waits until FILE shows PATTERN (or SECS pass).
wait_for() {
    n=0
    until grep -q "$2" "$1" 2>/dev/null || [ $n -ge "$3" ]; do
        sleep 1
        n=$((n + 1))
    done
    grep -q "$2" "$1" 2>/dev/null
}

# vm_state NAME: a managed VM's state as nestvm reports it.
vm_state() { /nestvm/nestvm vm show "$1" --json | sed -n 's/.*"state": *"\([A-Za-z]*\)".*/\1/p'; }

# wait_state NAME STATE SECS: waits until the managed VM is in STATE.
wait_state() {
    n=0
    until [ "$(vm_state "$1")" = "$2" ] || [ $n -ge "$3" ]; do
        sleep 1
        n=$((n + 1))
    done
    [ "$(vm_state "$1")" = "$2" ]
}

# state_in DIR NAME: the state of managed VM NAME in state directory DIR.
state_in() { /nestvm/nestvm --state-dir "$1" vm show "$2" --json | sed -n 's/.*"state": *"\([A-Za-z]*\)".*/\1/p'; }

# wait_live DIR NAME FILE PATTERN SECS: like wait_for, but gives up as soon
# as managed VM NAME (state directory DIR) no longer runs: what it would
# have printed can no longer come.
wait_live() {
    n=0
    until grep -q "$4" "$3" 2>/dev/null || [ $n -ge "$5" ]; do
        case "$(state_in "$1" "$2")" in Off | Saved) break ;; esac
        sleep 1
        n=$((n + 1))
    done
    grep -q "$4" "$3" 2>/dev/null
}

# dots FILE: how many dots (a ticker's ticks) FILE holds.
dots() { tr -cd . <"$1" | wc -c; }

# dots_past FILE COUNT SECS: waits until FILE holds more than COUNT dots:
# the ticker behind it is still running.
dots_past() {
    n=0
    until [ "$(dots "$1")" -gt "$2" ] || [ $n -ge "$3" ]; do
        sleep 1
        n=$((n + 1))
    done
    [ "$(dots "$1")" -gt "$2" ]
}
