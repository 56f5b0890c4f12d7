# In L2 (nesting on): KVM works here, and nestvm runs a tiny L3 guest.
check l2-sees-svm grep -qw svm /proc/cpuinfo
check l2-kvm-amd-loaded test -c /dev/kvm
check l2-host-check-yes /nestvm/nestvm host check
vm l3tiny 120 --kernel /guests/hello-reset.elf --memory 16M
check l2-runs-tiny-l3 rc_is l3tiny 0
check l3-tiny-printed logged l3tiny "LAB-TINY: hello from a tiny guest"
