/*
 * klpv-spin: a user-mode busy loop without a single system call, so that the
 * vCPU running it is almost always in user mode (CPL 3, the user GS base
 * loaded, the page-table-isolation user CR3) when the host stops the VM.
 * guest-images/dump-guest builds it freestanding: no libc, no startup code.
 */
void _start(void)
{
	for (;;)
		__asm__ volatile("pause" ::: "memory");
}
