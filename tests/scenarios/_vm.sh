# Sourced by scenarios (not one itself): run `vmm` in the background and
# follow its output, with FIFOs, never sleeps.
#
# Three streams, each on its own FIFO and copied to stdout by its own
# forwarder, one whole line per write, so no stream's line is ever cut by
# another's:
#   - COM2 (vmm --serial2-out): everything the guest's programs print, with
#     every "KLPV-" marker; the guest's init sends it there. The kernel never
#     prints on it, so no kernel message lands inside a marker.
#   - COM1, the console: kernel messages.
#   - vmm's own log (its stderr).
#
# VM_HIDE_MARKERS=1 (set before vm_spawn): COM2's "KLPV-" lines go only
# to the events FIFO, not to stdout (the demo, which a person reads).
#
# vm_spawn [--events] NAME [VMM-ARGS...]
#   Starts vmm with VMM-ARGS and the three streams under /tmp/klpv-vm-NAME;
#   its stdin is the FIFO "in" there. Sets VM_PID (the vmm), vm_dir and
#   VM_CONSOLE_FWD (the process copying the console to stdout).
#   With --events, fd 4 reads COM2's "KLPV-" lines (vm_wait); the caller
#   must then keep reading them.
# vm_start NAME GUEST-COMMAND [VMM-ARGS...]
#   vm_spawn --events with the guest command on the kernel command line
#   (after " -- ") and the control socket at $VM_SOCK; fd 3 writes to the
#   guest's console.
# qemu_start NAME GUEST-COMMAND [QEMU-ARGS...]
#   As vm_start, with the same guest under Debian's QEMU on L1's KVM
#   (qemu-system-x86_64 -enable-kvm -cpu host, 2 vCPUs, 256 MiB; -cpu and
#   vapic as in qemu-boot), for klpvisor-attach: the console on QEMU's
#   stdio (the FIFOs "in" and "console"), COM2 to the FIFO "com2" (the
#   guest's markers, fd 4 as with vm_start), QEMU's own messages to "log".
#   Sets VM_PID (QEMU), QMP_SOCK (the socket klpvisor-attach takes) and
#   QMP2_SOCK (a second one: QEMU serves one client per QMP socket, and the
#   scenario checks QEMU's monitor through it while the attach holds the
#   first), and VM_SOCK (where attach_start serves the API). vm_wait,
#   vm_send and vm_finish work as with vm_start.
# attach_start TAG [ATTACH-ARGS...]
#   Starts klpvisor-attach --qmp $QMP_SOCK --api-sock $VM_SOCK --arena
#   ATTACH-ARGS, its messages forwarded to stdout, and waits until it
#   serves the socket or exits (bounded polling). Sets ATTACH_PID; returns
#   1 if the socket did not come up.
# vm_wait PATTERN
#   Returns 0 at the next COM2 line starting "KLPV-" that contains PATTERN
#   (the line is in $VM_LINE), 1 if COM2 ends first.
# vm_send LINE
#   Writes LINE to the guest's console.
# vm_finish [LINE]
#   Sends LINE (default "done"), closes the console and waits for vmm and
#   the forwarders; returns vmm's exit code.
# vm_sleeper_asleep
#   Returns 0 once a guest task named `sleep` is asleep (state S) in the
#   VMM's task list (GET /tasks on $VM_SOCK), 1 after 2000 polls: bounded
#   polling of the guest's state, no timed sleep.
# vm_blocked_by_sleeper
#   Returns 0 once the pending transition names a `sleep` task among its
#   blockers, 1 after 500 polls; the last `patcher --json list` is in $l.
#   Only the pending transition's "blockers" array counts: a patch's name
#   (block_nsleep) and the errors of ended transitions may say "sleep"
#   too, and matching those once let a poll stop before the first attempt
#   had run.
# A vmm that has gone away must not kill the scenario with SIGPIPE when it
# writes to the console FIFO: the write fails and vm_finish reports vmm's
# exit code.
trap '' PIPE

# forward FIFO [COPY]: copies FIFO's lines to stdout, "KLPV-" lines also to
# the FIFO COPY. The writer of COPY (fd 5) stays open for the forwarder's
# life and its reader (fd 4 of the scenario) drains it, so the forwarder
# never blocks and neither does the vCPU writing the port.
forward() {
	(
		[ -z "${2:-}" ] || exec 5>"$2"
		while IFS= read -r line; do
			if [ -z "${2:-}" ]; then
				echo "$line"
				continue
			fi
			case $line in
			*KLPV-*)
				[ -n "${VM_HIDE_MARKERS:-}" ] || echo "$line"
				# (Fails once vm_finish has closed the reader.)
				echo "$line" >&5 2>/dev/null
				;;
			*) echo "$line" ;;
			esac
		done <"$1"
	) &
}

vm_spawn() {
	vm_events=
	[ "$1" = --events ] && { vm_events=1; shift; }
	vm_dir=/tmp/klpv-vm-$1
	shift
	rm -rf "$vm_dir"
	mkdir -p "$vm_dir"
	mkfifo "$vm_dir/console" "$vm_dir/com2" "$vm_dir/log" "$vm_dir/in" "$vm_dir/events"
	# shellcheck disable=SC2086 # KLPV_VMM_ARGS: extra vmm flags, split
	vmm --serial2-out "$vm_dir/com2" ${KLPV_VMM_ARGS:-} "$@" <"$vm_dir/in" >"$vm_dir/console" 2>"$vm_dir/log" &
	VM_PID=$!
	forward "$vm_dir/console"
	# The console's forwarder: a scenario may stop it (SIGSTOP) to play a
	# reader of the VMM's stdout that has stalled.
	VM_CONSOLE_FWD=$!
	forward "$vm_dir/log"
	if [ -n "$vm_events" ]; then
		forward "$vm_dir/com2" "$vm_dir/events"
		exec 4<"$vm_dir/events"
	else
		forward "$vm_dir/com2"
	fi
}

vm_start() {
	vm_name=$1
	vm_cmd=$2
	shift 2
	VM_SOCK=/tmp/klpv-vm-$vm_name/api.sock
	vm_spawn --events "$vm_name" --kernel "$KLPV_KERNEL" --initrd "$KLPV_INITRD" \
		--api-sock "$VM_SOCK" "$@" --cmdline "console=ttyS0 reboot=k panic=-1 -- $vm_cmd"
	exec 3>"$vm_dir/in"
}

qemu_start() {
	vm_name=$1
	vm_cmd=$2
	shift 2
	vm_dir=/tmp/klpv-vm-$vm_name
	rm -rf "$vm_dir"
	mkdir -p "$vm_dir"
	mkfifo "$vm_dir/console" "$vm_dir/com2" "$vm_dir/log" "$vm_dir/in" "$vm_dir/events"
	QMP_SOCK=$vm_dir/qmp.sock
	QMP2_SOCK=$vm_dir/qmp2.sock
	VM_SOCK=$vm_dir/api.sock
	qemu-system-x86_64 -enable-kvm -cpu "${KLPV_QEMU_CPU:-host}" -smp 2 -m 256 \
		-nodefaults -display none -no-reboot \
		-device pvpanic -action panic=exit-failure -global kvm-apic.vapic=off \
		-serial stdio -serial "file:$vm_dir/com2" \
		-qmp "unix:$QMP_SOCK,server=on,wait=off" -qmp "unix:$QMP2_SOCK,server=on,wait=off" \
		-kernel "$KLPV_KERNEL" -initrd "$KLPV_INITRD" \
		-append "console=ttyS0 panic=-1 -- $vm_cmd" "$@" \
		<"$vm_dir/in" >"$vm_dir/console" 2>"$vm_dir/log" &
	VM_PID=$!
	forward "$vm_dir/console"
	VM_CONSOLE_FWD=$!
	forward "$vm_dir/log"
	forward "$vm_dir/com2" "$vm_dir/events"
	exec 4<"$vm_dir/events"
	exec 3>"$vm_dir/in"
}

attach_n=0
attach_start() {
	attach_n=$((attach_n + 1))
	log=$vm_dir/attach-$1-$attach_n.log
	shift
	mkfifo "$log"
	klpvisor-attach --qmp "$QMP_SOCK" --api-sock "$VM_SOCK" --arena "$@" 2>"$log" &
	ATTACH_PID=$!
	forward "$log"
	i=0
	while [ $i -lt 1200 ]; do
		[ -S "$VM_SOCK" ] && return 0
		kill -0 "$ATTACH_PID" 2>/dev/null || return 1
		usleep 100000
		i=$((i + 1))
	done
	return 1
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
	# Nobody reads the markers any more: a forwarder's copy to the closed
	# FIFO fails (SIGPIPE is ignored) instead of blocking it.
	exec 4<&-
	wait "$VM_PID"
	vm_rc=$?
	wait
	return $vm_rc
}

vm_sleeper_asleep() {
	i=0
	while [ $i -lt 2000 ]; do
		patcher --api-sock "$VM_SOCK" tasks | grep -q " sleep  *S " && return 0
		i=$((i + 1))
	done
	return 1
}

vm_blocked_by_sleeper() {
	i=0
	while [ $i -lt 500 ]; do
		l=$(patcher --api-sock "$VM_SOCK" --json list | tr -d '\n')
		printf '%s' "$l" | grep -q '"blockers": \[[^]]*(sleep)' && return 0
		i=$((i + 1))
	done
	return 1
}
