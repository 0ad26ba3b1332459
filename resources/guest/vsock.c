/*
 * vsock: a netcat for AF_VSOCK and for moat's (Firecracker's) hybrid vsock
 * Unix socket, static, for moat's guest image and test rig. busybox has no
 * vsock support.
 *
 *   vsock CID PORT                 connect to CID:PORT
 *   vsock -l PORT                  accept one client on PORT
 *   vsock -L PORT CMD [ARG...]     accept clients forever; each runs CMD with
 *                                  the connection as stdin and stdout
 *   vsock -u PATH PORT             connect through moat's Unix socket PATH
 *                                  ("CONNECT PORT\n", then "OK ...\n")
 *   vsock -U PATH                  accept one client on the Unix socket PATH
 *   vsock -n N -u PATH PORT BYTES  N connections at once through PATH, each
 *                                  sending BYTES and reading them back (an
 *                                  echo service); prints "echo-ok N"
 *
 * The connecting and one-client modes copy stdin to the socket and the
 * socket to stdout; at the end of stdin they shut the socket's write side
 * (half-close), and exit when the peer has closed too. The listening modes
 * say "vsock: listening on PORT" on stderr once clients can connect.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static void die(const char *what)
{
	fprintf(stderr, "vsock: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(void)
{
	fprintf(stderr, "usage: vsock CID PORT | -l PORT | -L PORT CMD... | "
			"-u PATH PORT | -U PATH | -n N -u PATH PORT BYTES\n");
	exit(2);
}

static unsigned long number(const char *s)
{
	char *end;
	errno = 0;
	unsigned long n = strtoul(s, &end, 10);
	if (errno || *s == 0 || *end != 0)
		usage();
	return n;
}

static int vsock_listen(unsigned port)
{
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		die("socket");
	if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("bind");
	if (listen(s, 256) < 0)
		die("listen");
	fprintf(stderr, "vsock: listening on %u\n", port);
	return s;
}

static int vsock_connect(unsigned cid, unsigned port)
{
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		die("socket");
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("connect");
	return s;
}

static struct sockaddr_un unix_addr(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(a.sun_path)) {
		fprintf(stderr, "vsock: path too long: %s\n", path);
		exit(2);
	}
	strcpy(a.sun_path, path);
	return a;
}

/* Reads one line (the hybrid protocol's "OK <port>\n") byte by byte. */
static void read_ok(int s)
{
	char line[64];
	size_t n = 0;
	while (n < sizeof(line) - 1) {
		ssize_t r = read(s, line + n, 1);
		if (r <= 0) {
			fprintf(stderr, "vsock: no OK from moat (the guest refused?)\n");
			exit(1);
		}
		if (line[n++] == '\n')
			break;
	}
	line[n] = 0;
	if (strncmp(line, "OK ", 3) != 0) {
		fprintf(stderr, "vsock: unexpected answer: %s", line);
		exit(1);
	}
}

static int hybrid_connect(const char *path, unsigned port)
{
	struct sockaddr_un a = unix_addr(path);
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	if (s < 0)
		die("socket");
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0)
		die(path);
	char line[32];
	int len = snprintf(line, sizeof(line), "CONNECT %u\n", port);
	if (write(s, line, len) != len)
		die("write CONNECT");
	read_ok(s);
	return s;
}

static int unix_listen(const char *path)
{
	struct sockaddr_un a = unix_addr(path);
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	if (s < 0)
		die("socket");
	unlink(path);
	if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0)
		die(path);
	if (listen(s, 16) < 0)
		die("listen");
	fprintf(stderr, "vsock: listening on %s\n", path);
	return s;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t w = write(fd, buf, len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		buf += w;
		len -= (size_t)w;
	}
	return 0;
}

/* stdin -> s and s -> stdout until both directions end: the peer's end of
 * file does not stop what we still have to send, nor ours what it sends. */
static void copy(int s)
{
	static char buf[65536];
	int in_open = 1, sock_open = 1;
	while (sock_open || in_open) {
		struct pollfd p[2] = { { .fd = sock_open ? s : -1, .events = POLLIN },
				       { .fd = in_open ? 0 : -1, .events = POLLIN } };
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (p[0].revents) {
			ssize_t r = read(s, buf, sizeof(buf));
			if (r <= 0)
				sock_open = 0;
			else if (write_all(1, buf, (size_t)r) < 0)
				die("write stdout");
		}
		if (p[1].revents) {
			ssize_t r = read(0, buf, sizeof(buf));
			if (r <= 0) {
				in_open = 0;
				shutdown(s, SHUT_WR);
			} else if (write_all(s, buf, (size_t)r) < 0) {
				die("write socket");
			}
		}
	}
}

static void serve_forever(int l, char **cmd)
{
	signal(SIGCHLD, SIG_IGN);
	for (;;) {
		int c = accept(l, NULL, NULL);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			die("accept");
		}
		pid_t pid = fork();
		if (pid == 0) {
			close(l);
			dup2(c, 0);
			dup2(c, 1);
			close(c);
			execvp(cmd[0], cmd);
			die(cmd[0]);
		}
		close(c);
	}
}

/* N concurrent echo round trips of `bytes` each through moat's socket. */
static void echo_test(unsigned n, const char *path, unsigned port, size_t bytes)
{
	int *s = calloc(n, sizeof(int));
	size_t *sent = calloc(n, sizeof(size_t)), *got = calloc(n, sizeof(size_t));
	char *out = malloc(bytes), *in = malloc(65536);
	if (!s || !sent || !got || !out || !in)
		die("calloc");
	for (size_t i = 0; i < bytes; i++)
		out[i] = (char)(i * 7 + 3);
	for (unsigned i = 0; i < n; i++)
		s[i] = hybrid_connect(path, port);
	unsigned done = 0;
	struct pollfd *p = calloc(n, sizeof(struct pollfd));
	while (done < n) {
		for (unsigned i = 0; i < n; i++) {
			p[i].fd = got[i] < bytes ? s[i] : -1;
			p[i].events = POLLIN | (sent[i] < bytes ? POLLOUT : 0);
		}
		if (poll(p, n, 30000) <= 0)
			die("poll (stalled)");
		for (unsigned i = 0; i < n; i++) {
			if (p[i].revents & POLLOUT && sent[i] < bytes) {
				ssize_t w = write(s[i], out + sent[i], bytes - sent[i]);
				if (w > 0)
					sent[i] += (size_t)w;
				if (sent[i] == bytes)
					shutdown(s[i], SHUT_WR);
			}
			if (p[i].revents & (POLLIN | POLLHUP) && got[i] < bytes) {
				ssize_t r = read(s[i], in, 65536);
				if (r <= 0) {
					fprintf(stderr, "vsock: connection %u ended after %zu of %zu bytes\n",
						i, got[i], bytes);
					exit(1);
				}
				if (memcmp(in, out + got[i], (size_t)r) != 0) {
					fprintf(stderr, "vsock: connection %u: wrong echo at byte %zu\n", i, got[i]);
					exit(1);
				}
				got[i] += (size_t)r;
				if (got[i] == bytes)
					done++;
			}
		}
	}
	printf("echo-ok %u\n", n);
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc >= 3 && strcmp(argv[1], "-l") == 0) {
		int l = vsock_listen((unsigned)number(argv[2]));
		int c = accept(l, NULL, NULL);
		if (c < 0)
			die("accept");
		close(l);
		copy(c);
	} else if (argc >= 4 && strcmp(argv[1], "-L") == 0) {
		serve_forever(vsock_listen((unsigned)number(argv[2])), argv + 3);
	} else if (argc == 4 && strcmp(argv[1], "-u") == 0) {
		copy(hybrid_connect(argv[2], (unsigned)number(argv[3])));
	} else if (argc == 3 && strcmp(argv[1], "-U") == 0) {
		int l = unix_listen(argv[2]);
		int c = accept(l, NULL, NULL);
		if (c < 0)
			die("accept");
		close(l);
		copy(c);
	} else if (argc == 7 && strcmp(argv[1], "-n") == 0 && strcmp(argv[3], "-u") == 0) {
		echo_test((unsigned)number(argv[2]), argv[4], (unsigned)number(argv[5]),
			  number(argv[6]));
	} else if (argc == 3 && argv[1][0] != '-') {
		copy(vsock_connect((unsigned)number(argv[1]), (unsigned)number(argv[2])));
	} else {
		usage();
	}
	return 0;
}
