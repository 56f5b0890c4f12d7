# Managed VMs in L1, with Debian's kernel as the guest: start detached, the
# console (type, detach, re-attach), pause/resume, the guest's own power-off,
# a graceful stop through the ACPI power button, and enable-nested.
KERNEL="--kernel /next/vmlinuz --initrd /next/initrd"
CMD="console=ttyS0 reboot=k panic=-1 quiet lab.level=2"
N=/nestvm/nestvm
export NESTVM_STATE_DIR=/tmp/state
log() { echo "/tmp/state/vms/$1/console.log"; }

$N vm new g $KERNEL --memory 256M --nested off --cmdline "$CMD lab.script=shell"
$N vm start g >/tmp/start.txt 2>&1
cat /tmp/start.txt
require mg-start grep -q "started VM 'g'" /tmp/start.txt
check mg-list-running sh -c "$N vm list | grep -q '^g .*Running'"
require mg-shell-ready wait_for "$(log g)" "shell ready" 300

# type LINE MARK: types LINE into the guest's shell through the console,
# and detaches (Ctrl-]) once the guest's console log shows MARK: its
# answer has come, so the console has shown it too.
type_then_detach() {
    printf '%s\n' "$1"
    wait_for "$(log g)" "$2" 120
    printf '\035'
}

# Type into the guest's shell through the console, then detach with Ctrl-].
type_then_detach 'echo "LAB-L2: typed=$((6 * 7))"' "LAB-L2: typed=42" | $N vm console g >/tmp/c1.txt 2>&1
cat /tmp/c1.txt
check mg-console-input-reached-guest grep -q "LAB-L2: typed=42" /tmp/c1.txt
check mg-console-detached grep -q "detached from VM 'g'" /tmp/c1.txt
check mg-running-after-detach [ "$(vm_state g)" = Running ]

# Re-attach: earlier output is shown, and new input works.
type_then_detach 'echo "LAB-L2: again=$((7 * 7))"' "LAB-L2: again=49" | $N vm console g >/tmp/c2.txt 2>&1
cat /tmp/c2.txt
check mg-reattach-shows-earlier-output grep -q "LAB-L2: typed=42" /tmp/c2.txt
check mg-reattach-new-output grep -q "LAB-L2: again=49" /tmp/c2.txt

$N vm pause g
check mg-paused [ "$(vm_state g)" = Paused ]
$N vm resume g
check mg-resumed [ "$(vm_state g)" = Running ]

# The guest powers itself off (its shell exits, init powers off); the
# console ends with the VM.
printf 'exit\n' | $N vm console g >/tmp/c3.txt 2>&1
check mg-off-after-guest-poweroff wait_state g Off 120
check mg-log-says-poweroff sh -c "$N vm show g | grep -q PowerOff"

# A graceful stop: the ACPI power button, handled in the guest by acpid.
$N vm new b $KERNEL --memory 256M --nested off --cmdline "$CMD lab.script=acpid"
$N vm start b
require mg-acpid-ready wait_for "$(log b)" "acpid ready" 300
$N vm stop b --timeout 120 >/tmp/stop.txt 2>&1
cat /tmp/stop.txt
check mg-stop-graceful grep -q "the guest powered off" /tmp/stop.txt
check mg-guest-saw-power-button grep -q "LAB-L2: power button pressed" "$(log b)"
check mg-off-after-stop [ "$(vm_state b)" = Off ]

# enable-nested: a VM without nesting sees svm once it is applied.
$N vm new e $KERNEL --memory 256M --nested off --cmdline "$CMD lab.script=report"
$N vm start e
check mg-e-ran-and-powered-off wait_state e Off 300
check mg-e-ran-without-svm grep -q 'LAB-L2: svm=no' "$(log e)"
$N status >/tmp/status1.txt
cat /tmp/status1.txt
check mg-status-says-not-exposed grep -q "not exposed" /tmp/status1.txt
$N vm enable-nested e --yes --keep-memory
$N vm start e
check mg-e-ran-again wait_state e Off 300
check mg-e-sees-svm-after-enable grep -q 'LAB-L2: svm=yes' "$(log e)"
$N status >/tmp/status2.txt
cat /tmp/status2.txt
check mg-status-e-can-host-vms grep -q "^e .* yes" /tmp/status2.txt

# enable-nested on a running VM stops it first (gracefully: b runs acpid).
$N vm start b
check mg-b-acpid-ready-again wait_for "$(log b)" "acpid ready" 300
$N vm enable-nested b --yes --keep-memory --timeout 120 >/tmp/en.txt 2>&1
cat /tmp/en.txt
check mg-enable-stopped-running-vm grep -q "stopped VM 'b' (PoweredOff)" /tmp/en.txt
check mg-enable-applied sh -c "$N vm show b | grep -q 'nested:  on'"

$N vm rm g && $N vm rm b && $N vm rm e
check mg-all-removed sh -c "$N vm list | grep -q 'no VMs'"
