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
 *      or, if argv[1] is "wait", reads a line from the console, then
 *      writes the boot-timer port again and MOAT-BENCH-RESUMED (the
 *      snapshot benchmark snapshots the guest while it waits, and types
 *      the line into the restored VM);
 *   4. reboots: with reboot=k moat exits, with reboot=t and -no-reboot
 *      QEMU does; or, if argv[2] is "off", powers off (through ACPI):
 *      Cloud Hypervisor restarts a guest that reboots and ends only when
 *      it powers off.
 *
 * Needs a kernel with CONFIG_X86_IOPL_IOPERM (for ioperm(2)) and, to wait,
 * CONFIG_DEVPORT.
 *
 * After the wait, the I/O goes through the console (fd 0 and 1, which the
 * kernel opens on /dev/console from its built-in initramfs) and /dev/port,
 * not through ioperm: in the test rig a restored guest's own port I/O
 * faults. QEMU's TCG lets user mode reach a port only while TR's cached
 * type is "available TSS" (9), which is what its LTR leaves there, but KVM
 * reports and restores the busy type (11) that hardware holds; the
 * snapshot carries 11 back, and TCG refuses. Hardware accepts both.
 */

#define SYS_READ 0
#define SYS_WRITE 1
#define SYS_OPEN 2
#define SYS_PWRITE64 18
#define SYS_NANOSLEEP 35
#define SYS_MKDIR 83
#define SYS_MKNOD 133
#define SYS_IOPERM 173
#define SYS_REBOOT 169
#define SYS_PAUSE 34
#define BOOT_TIMER_PORT 0xf4
#define BOOT_TIMER_MAGIC 123
#define COM1 0x3f8
#define O_RDWR 2
#define S_IFCHR 0020000
#define DEV_PORT ((1 << 8) | 4) /* char 1:4 */
#define REBOOT_MAGIC1 0xfee1deadL
#define REBOOT_MAGIC2 672274793L
#define REBOOT_CMD_RESTART 0x01234567L
#define REBOOT_CMD_POWER_OFF 0x4321fedcL

static long syscall3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static long syscall4(long nr, long a, long b, long c, long d)
{
	long ret;
	register long r10 __asm__("r10") = d;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return ret;
}

static void outb(unsigned short port, unsigned char value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static void sleep_ms(long ms)
{
	struct {
		long sec, nsec;
	} ts = {ms / 1000, (ms % 1000) * 1000000};
	syscall3(SYS_NANOSLEEP, (long)&ts, 0, 0);
}

/* Waits for a line on the console, then says so (see the top). */
static void wait_for_console(void)
{
	static const char resumed[] = "\nMOAT-BENCH-RESUMED\n";
	unsigned char timer = BOOT_TIMER_MAGIC;
	char line[64];
	long port;

	syscall3(SYS_MKDIR, (long)"/dev", 0755, 0);
	syscall3(SYS_MKNOD, (long)"/dev/port", S_IFCHR | 0600, DEV_PORT);
	port = syscall3(SYS_OPEN, (long)"/dev/port", O_RDWR, 0);
	if (syscall3(SYS_READ, 0, (long)line, sizeof(line)) < 0)
		return;
	if (port >= 0)
		syscall4(SYS_PWRITE64, port, (long)&timer, 1, BOOT_TIMER_PORT);
	syscall3(SYS_WRITE, 1, (long)resumed, sizeof(resumed) - 1);
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

	if (argc > 1 && argv[1][0] == 'w')
		wait_for_console();
	else if (argc > 1)
		sleep_ms(parse_ms(argv[1]));
	syscall3(SYS_REBOOT, REBOOT_MAGIC1, REBOOT_MAGIC2,
		 argc > 2 && argv[2][0] == 'o' ? REBOOT_CMD_POWER_OFF : REBOOT_CMD_RESTART);
	/* Not reached; pid 1 must never exit. */
	for (;;)
		syscall3(SYS_PAUSE, 0, 0, 0);
}

__asm__(".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start\n");
