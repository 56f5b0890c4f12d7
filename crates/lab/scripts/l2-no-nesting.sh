# In L2 with nesting off: no svm, kvm-amd refuses, and nestvm says why.
check l2off-no-svm sh -c '! grep -qw svm /proc/cpuinfo'
check l2off-no-kvm-device test ! -e /dev/kvm
vm l3refused 60 --kernel /guests/hello-reset.elf --memory 16M
check l2off-nestvm-exit-1 rc_is l3refused 1
check l2off-nestvm-says-why logged l3refused "this host cannot run VMs"
check l2off-nestvm-names-cause logged l3refused "neither vmx nor svm"
