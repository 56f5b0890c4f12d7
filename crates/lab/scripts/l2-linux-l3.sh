# In L2 (nesting on): nestvm boots Debian's kernel as L3.
vm l3linux 600 --kernel /next/vmlinuz --initrd /next/initrd --memory 256M \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lab.level=3 lab.script=report"
check l2-runs-linux-l3 rc_is l3linux 0
check l3-linux-init-reached logged l3linux "LAB-L3: init reached"
