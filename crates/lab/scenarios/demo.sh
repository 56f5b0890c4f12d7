# The README's demo, in L1.
say "L1 is up: an emulated AMD EPYC with SVM; kvm-amd is loaded with nested=1"
say "starting nestvm: Debian's kernel as L2, 2 vCPUs, 512 MiB, console on this terminal"
vm demo 300 --kernel /next/vmlinuz --initrd /next/initrd --cpus 2 --memory 512M \
    --cmdline "console=ttyS0 reboot=k panic=-1 lab.level=2 lab.nested=1 lab.script=report"
check demo-guest-powered-off-cleanly rc_is demo 0
check demo-guest-saw-2-cpus [ "$(value demo nproc)" = 2 ]
check demo-guest-saw-svm [ "$(value demo svm)" = yes ]
check demo-guest-loaded-kvm-amd logged demo "LAB-L2: kvm-amd loaded nested=1"
