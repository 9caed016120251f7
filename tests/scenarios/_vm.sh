# Sourced by scenarios (not one itself): run `vmm` with a control socket in
# the background and wait for a console line, with FIFOs, never sleeps.
#
# vm_start NAME PATTERN GUEST-COMMAND [VMM-ARGS...]
#   Boots the guest with `-- GUEST-COMMAND` on its command line and the
#   control socket at $VM_SOCK; the console is copied to stdout. Returns 0
#   once a console line contains PATTERN, 1 if the console ends first.
#   Sets VM_PID (the vmm) and VM_SOCK; fd 3 writes to the guest's console.
# vm_finish
#   Sends a line to the guest console, closes it and waits for vmm;
#   returns vmm's exit code.
vm_start() {
	vm_dir=/tmp/klpv-vm-$1
	vm_pattern=$2
	vm_cmd=$3
	shift 3
	rm -rf "$vm_dir"
	mkdir -p "$vm_dir"
	mkfifo "$vm_dir/out" "$vm_dir/in" "$vm_dir/ready"
	VM_SOCK=$vm_dir/api.sock
	vmm --kernel "$KLPV_KERNEL" --initrd "$KLPV_INITRD" --api-sock "$VM_SOCK" "$@" \
		--cmdline "console=ttyS0 reboot=k panic=-1 -- $vm_cmd" \
		<"$vm_dir/in" >"$vm_dir/out" 2>&1 &
	VM_PID=$!
	(
		seen=0
		while IFS= read -r line; do
			echo "$line"
			if [ $seen = 0 ]; then
				case $line in
				*"$vm_pattern"*) seen=1; echo ok >"$vm_dir/ready" ;;
				esac
			fi
		done <"$vm_dir/out"
		[ $seen = 1 ] || echo eof >"$vm_dir/ready"
	) &
	exec 3>"$vm_dir/in"
	read -r vm_state <"$vm_dir/ready"
	[ "$vm_state" = ok ]
}

vm_finish() {
	echo "${1:-done}" >&3
	exec 3>&-
	wait "$VM_PID"
	vm_rc=$?
	wait
	return $vm_rc
}
