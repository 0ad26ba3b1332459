/*
 * moat's benchmark /init: the whole userspace of the start-up benchmark
 * guest. A static binary without libc, so that its first instructions are
 * the marker writes and nothing runs before them:
 *
 *   1. writes 123 to I/O port 0xf4, moat's boot timer (`moat run
 *      --boot-timer` reports the time of the write);
 *   2. writes MOAT-BENCH-INIT to COM1's transmit register, a marker any
 *      VMM with a serial console shows (the side-by-side with QEMU uses it);
 *   3. sleeps for argv[1] milliseconds, if given (after "--" on the kernel
 *      command line), so that the VMM can be measured with a booted guest;
 *   4. reboots: with reboot=k moat exits, with reboot=t and -no-reboot
 *      QEMU does.
 *
 * Needs a kernel with CONFIG_X86_IOPL_IOPERM (for ioperm(2)).
 */

#define SYS_NANOSLEEP 35
#define SYS_IOPERM 173
#define SYS_REBOOT 169
#define SYS_PAUSE 34
#define BOOT_TIMER_PORT 0xf4
#define BOOT_TIMER_MAGIC 123
#define COM1 0x3f8
#define REBOOT_MAGIC1 0xfee1deadL
#define REBOOT_MAGIC2 672274793L
#define REBOOT_CMD_RESTART 0x01234567L

static long syscall3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static void outb(unsigned short port, unsigned char value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static long parse_ms(const char *s)
{
	long ms = 0;
	for (; *s >= '0' && *s <= '9'; s++)
		ms = ms * 10 + (*s - '0');
	return ms;
}

/* sp points at argc, then argv[0..argc], NULL, envp... (x86-64 ABI). */
__attribute__((noreturn, used)) static void start(long *sp)
{
	static const char marker[] = "\nMOAT-BENCH-INIT\n";
	long argc = sp[0];
	char **argv = (char **)(sp + 1);

	if (syscall3(SYS_IOPERM, BOOT_TIMER_PORT, 1, 1) == 0)
		outb(BOOT_TIMER_PORT, BOOT_TIMER_MAGIC);
	if (syscall3(SYS_IOPERM, COM1, 1, 1) == 0)
		for (const char *p = marker; *p; p++)
			outb(COM1, (unsigned char)*p);

	if (argc > 1) {
		long ms = parse_ms(argv[1]);
		struct {
			long sec, nsec;
		} ts = {ms / 1000, (ms % 1000) * 1000000};
		syscall3(SYS_NANOSLEEP, (long)&ts, 0, 0);
	}
	syscall3(SYS_REBOOT, REBOOT_MAGIC1, REBOOT_MAGIC2, REBOOT_CMD_RESTART);
	/* Not reached; pid 1 must never exit. */
	for (;;)
		syscall3(SYS_PAUSE, 0, 0, 0);
}

__asm__(".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start\n");
