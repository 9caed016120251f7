# Sourced by scenarios (not one itself): run `vmm` with a control socket in
# the background and follow its console, with FIFOs, never sleeps.
#
# vm_start NAME GUEST-COMMAND [VMM-ARGS...]
#   Boots the guest with `-- GUEST-COMMAND` on its command line and the
#   control socket at $VM_SOCK; the console is copied to stdout. Sets VM_PID
#   (the vmm) and VM_SOCK; fd 3 writes to the guest's console.
# vm_wait PATTERN
#   Returns 0 at the next console line starting "KLPV-" that contains
#   PATTERN (the line is in $VM_LINE), 1 if the console ends first.
# vm_send LINE
#   Writes LINE to the guest's console.
# vm_finish [LINE]
#   Sends LINE (default "done"), closes the console and waits for vmm;
#   returns vmm's exit code.
# A vmm that has gone away must not kill the scenario with SIGPIPE when it
# writes to the console FIFO: the write fails and vm_finish reports vmm's
# exit code.
trap '' PIPE

vm_start() {
	vm_dir=/tmp/klpv-vm-$1
	vm_cmd=$2
	shift 2
	rm -rf "$vm_dir"
	mkdir -p "$vm_dir"
	mkfifo "$vm_dir/out" "$vm_dir/in" "$vm_dir/events"
	VM_SOCK=$vm_dir/api.sock
	vmm --kernel "$KLPV_KERNEL" --initrd "$KLPV_INITRD" --api-sock "$VM_SOCK" "$@" \
		--cmdline "console=ttyS0 reboot=k panic=-1 -- $vm_cmd" \
		<"$vm_dir/in" >"$vm_dir/out" 2>&1 &
	VM_PID=$!
	# Forwards the console; "KLPV-" lines also go to the events FIFO, which
	# this shell keeps open (fd 4), so the forwarder never blocks on it
	# (a blocked console would stall the vCPU writing it, and a pause).
	(
		exec 5>"$vm_dir/events"
		while IFS= read -r line; do
			echo "$line"
			case $line in
			*KLPV-*) echo "$line" >&5 ;;
			esac
		done <"$vm_dir/out"
	) &
	exec 4<"$vm_dir/events"
	exec 3>"$vm_dir/in"
}

vm_wait() {
	while IFS= read -r VM_LINE <&4; do
		case $VM_LINE in
		*"$1"*) return 0 ;;
		esac
	done
	return 1
}

vm_send() {
	echo "$1" >&3
}

vm_finish() {
	kill -0 "$VM_PID" 2>/dev/null || echo "KLPV-VM vmm exited before the scenario finished"
	echo "${1:-done}" >&3 2>/dev/null
	exec 3>&-
	wait "$VM_PID"
	vm_rc=$?
	wait
	exec 4<&-
	return $vm_rc
}
