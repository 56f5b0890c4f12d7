# Run inside a guest: an interactive shell on the console, fed by the level
# above through nestvm's stdin and the guest's 16550.
say "shell ready"
sh
say "shell ended"
