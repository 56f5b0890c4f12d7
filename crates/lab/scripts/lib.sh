# Helpers for lab scripts, at every level.

# A line on the console, tagged with this level.
say() { echo "LAB-L$LEVEL: $*"; }

# check NAME COMMAND...: runs the command and reports PASS or FAIL for NAME.
# The test on the host expects every check it names to PASS.
check() {
    name=$1
    shift
    if "$@" >/dev/null 2>&1; then
        echo "LAB-CHECK PASS $name"
    else
        echo "LAB-CHECK FAIL $name"
    fi
}

# load_kvm NESTED: loads KVM for AMD with nested=NESTED.
load_kvm() {
    mods=/lib/modules/$(uname -r)
    for m in irqbypass kvm ccp; do
        insmod "$mods/$m.ko" || say "insmod $m failed"
    done
    if insmod "$mods/kvm-amd.ko" "nested=$1" 2>/tmp/kvm-amd.err; then
        say "kvm-amd loaded nested=$(cat /sys/module/kvm_amd/parameters/nested)"
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

# rc_is NAME CODE: the exit code of vm NAME was CODE.
rc_is() { [ "$(cat "/tmp/$1.rc")" = "$2" ]; }

# logged NAME PATTERN: vm NAME's console showed PATTERN.
logged() { grep -q "$2" "/tmp/$1.log"; }

# value NAME KEY: the value of "KEY=value" that vm NAME's console showed last.
value() { sed -n "s/.*$2=\([0-9A-Za-z_.-]*\).*/\1/p" "/tmp/$1.log" | tail -n 1; }

# between LOW HIGH VALUE: LOW <= VALUE <= HIGH (integers).
between() { [ -n "$3" ] && [ "$3" -ge "$1" ] && [ "$3" -le "$2" ]; }

# vm_typed NAME TIMEOUT INPUT ARGS...: like vm, but once the guest's console
# shows "shell ready", types the lines of file INPUT into nestvm's stdin.
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
        sleep 1
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
